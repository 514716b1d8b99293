"""Figures: reconstruction contact sheets (and, with the encoding analysis, cortical maps)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def contact_sheet(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | Path,
    column_titles: Sequence[str] = (),
    row_titles: Sequence[str] = (),
    cell_inches: float = 1.6,
) -> Path:
    """A grid of images (rows of H x W x 3 uint8 arrays, ragged rows allowed) saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    figure, axes = plt.subplots(
        n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * n_rows + 0.3), squeeze=False
    )
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(row):
                ax.imshow(row[j])
            if i == 0 and j < len(column_titles):
                ax.set_title(column_titles[j], fontsize=9)
            if j == 0 and i < len(row_titles):
                ax.set_ylabel(row_titles[i], fontsize=8)
    figure.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# --- cortical maps and the encoding comparisons --------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def volume_mosaic(
    values: np.ndarray,
    brain: np.ndarray,
    path: str | Path,
    title: str = "",
    cmap: str = "hot",
    vmax: float | None = None,
) -> Path:
    """Axial slices of a (X, Y, Z) map over a grey brain mask; NaN values are not drawn. Saved as a PNG."""
    plt = _pyplot()
    slices = [k for k in range(brain.shape[2]) if brain[:, :, k].any()]
    step = max(1, len(slices) // 24)
    slices = slices[::step]
    n_cols = min(8, len(slices))
    n_rows = -(-len(slices) // n_cols)
    finite = values[np.isfinite(values)]
    vmax = vmax or (float(np.percentile(np.abs(finite), 99)) if finite.size else 1.0) or 1.0
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.8 * n_rows + 0.6), squeeze=False)
    image = None
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), slices):
        ax.imshow(brain[:, :, k].T, cmap="gray", vmin=0, vmax=2.5, origin="lower")
        image = ax.imshow(values[:, :, k].T, cmap=cmap, vmin=0, vmax=vmax, origin="lower", interpolation="nearest")
        ax.set_title(f"z={k}", fontsize=7)
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="r")
    figure.suptitle(title, fontsize=10)
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def roi_lines(series: dict[str, dict[float, float]], path: str | Path, xlabel: str, title: str) -> Path:
    """One line per ROI: mean r (y) against a swept setting (x). ``series``: roi -> {x: mean r}."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 4))
    for roi, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=roi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean test r")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def roi_bars(results: dict, path: str | Path, title: str) -> Path:
    """Grouped bars: mean r per ROI for each feature space."""
    plt = _pyplot()
    rois = [r for r in results[next(iter(results))].rois if r != "unknown"]
    width = 0.8 / len(results)
    figure, ax = plt.subplots(figsize=(max(6, 1.1 * len(rois)), 4))
    for i, (name, result) in enumerate(results.items()):
        ax.bar(np.arange(len(rois)) + i * width, [result.rois[r]["mean_r"] for r in rois], width, label=name)
    ax.set_xticks(np.arange(len(rois)) + 0.4 - width / 2, rois, rotation=30, fontsize=8)
    ax.set_ylabel("mean test r")
    ax.set_title(title)
    ax.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def winner_mosaic(results: dict, voxels, path: str | Path, title: str) -> Path:
    """Which feature space predicts each voxel best (among voxels significant for at least one), per axial slice."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    names = list(results)
    r = np.stack([results[n].r for n in names])
    significant = np.stack([results[n].significant for n in names]).any(0)
    winner = np.where(significant, r.argmax(0) + 1.0, np.nan)
    volume = voxels.to_volume(winner)
    brain = np.zeros(voxels.grid_shape, dtype=float)
    brain[tuple(voxels.ijk.T)] = 1
    colours = plt.get_cmap("tab10").colors[: len(names)]
    slices = [k for k in range(brain.shape[2]) if brain[:, :, k].any()]
    slices = slices[:: max(1, len(slices) // 24)]
    n_cols = min(8, len(slices))
    n_rows = -(-len(slices) // n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.8 * n_rows + 0.8), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), slices):
        ax.imshow(brain[:, :, k].T, cmap="gray", vmin=0, vmax=2.5, origin="lower")
        ax.imshow(volume[:, :, k].T, cmap=ListedColormap(colours), vmin=0.5, vmax=len(names) + 0.5, origin="lower")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    figure.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8)
    figure.suptitle(title, fontsize=10)
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def encoding_figures(results: dict, voxels, out: str | Path) -> list[Path]:
    """Every figure the feature spaces in ``results`` allow: an r map each, and the paper's comparisons."""
    from .encoding import safe_name
    from .features import FeatureSpec

    out = Path(out)
    brain = np.zeros(voxels.grid_shape, dtype=float)
    brain[tuple(voxels.ijk.T)] = 1
    paths = []
    for name, result in results.items():
        values = voxels.to_volume(np.where(result.significant, result.r, np.nan))
        title = f"{name}: test r where FDR q < 0.05 ({result.significant.sum()} of {len(result.r)} voxels)"
        paths.append(volume_mosaic(values, brain, out / f"map_{safe_name(name)}.png", title))
    specs = {name: FeatureSpec.parse(name) for name in results}

    # z vs c vs zc: which predicts each voxel best
    main = {n: results[n] for n, s in specs.items() if s.kind in ("z", "c", "zc")}
    if len(main) >= 2:
        paths.append(winner_mosaic(main, voxels, out / "compare_winner.png", "best-predicting feature per voxel"))
        paths.append(roi_bars(main, out / "compare_rois.png", "z vs c vs zc: mean test r per ROI"))

    def sweep(selected: dict[str, float], file: str, xlabel: str, title: str) -> None:
        if len(selected) >= 2:
            rois = [r for r in results[next(iter(selected))].rois if r != "unknown"]
            series = {roi: {x: results[n].rois[roi]["mean_r"] for n, x in selected.items()} for roi in rois}
            paths.append(roi_lines(series, out / file, xlabel, title))

    sweep({n: s.strength for n, s in specs.items() if s.kind == "zc"}, "sweep_noise.png", "strength", "zc by noise")
    unet = {n: s for n, s in specs.items() if s.kind == "unet"}
    for block in sorted({s.block for s in unet.values()}):
        for strength in sorted({s.strength for s in unet.values()}):
            chosen = {n: s.step for n, s in unet.items() if s.block == block and s.strength == strength}
            sweep(chosen, f"sweep_steps_{block}_{strength:g}.png", "denoising step", f"U-Net {block}: steps")
    order = {b: i for i, b in enumerate(("down0", "down1", "down2", "down3", "mid", "up0", "up1", "up2", "up3"))}
    for strength, step in sorted({(s.strength, s.step) for s in unet.values()}):
        chosen = {n: order[s.block] for n, s in unet.items() if (s.strength, s.step) == (strength, step)}
        sweep(chosen, f"sweep_layers_{strength:g}_{step}.png", "U-Net block (down0 ... up3)", "U-Net layers")
    return paths


def flatmap(values: np.ndarray, subject: int, path: str | Path, title: str = "") -> Path:
    """A pycortex flatmap of a (X, Y, Z) volume, when pycortex and the subject's surfaces are installed."""
    try:
        import cortex
    except ImportError as err:
        from .validation import InputError

        raise InputError(
            "flatmaps need pycortex (pip install pycortex) and the subject's surfaces in its database "
            f"(e.g. NSD's subj{subject:02d} from nsddata/freesurfer); volume mosaics were written instead"
        ) from err
    name = f"subj{subject:02d}"
    try:
        volume = cortex.Volume(values.T, name, "func1pt8_to_anat0pt8_autoFSbbr", cmap="hot")
        figure = cortex.quickflat.make_figure(volume, with_curvature=True)
    except Exception as err:
        from .validation import InputError

        raise InputError(f"pycortex has no usable surfaces or transform for {name}: {err}") from err
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    return Path(path)
