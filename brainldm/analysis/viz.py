"""Figures: reconstruction contact sheets, and cortical maps as volume slices or pycortex flatmaps.

This module only draws; :mod:`brainldm.analysis.encoding` decides which maps and comparisons to draw.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brainldm.analysis.surfaces import check_space
from brainldm.paths import atomic_path
from brainldm.reconstruction.folders import is_done, load_trial_images
from brainldm.validation import InputError


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
    return save_figure(figure, path, dpi=110, tight=False)


# --- cortical maps and the encoding comparisons --------------------------------------------------------------


def write_contact_sheet(folders: Sequence[Path], path: str | Path, max_rows: int = 12) -> Path:
    """One row per trial: original, Xz, then Xc and Xzc for each sample."""

    rows, titles, columns = [], [], []
    for folder in [f for f in folders if is_done(f)][:max_rows]:
        meta, images = load_trial_images(folder)
        samples = range(meta["num_samples"])
        columns = ["original", "Xz"] + [f"Xc {s}" for s in samples] + [f"Xzc {s}" for s in samples]
        keys = ["original", "Xz"] + [f"Xc_{s}" for s in samples] + [f"Xzc_{s}" for s in samples]
        rows.append([images[k] for k in keys])
        titles.append(f"nsd {meta['nsd_id']}")
    if not rows:
        raise InputError("no finished reconstructions to put on a contact sheet")
    return contact_sheet(rows, path, column_titles=columns, row_titles=titles)


def save_figure(figure, path: str | Path, dpi: int = 100, tight: bool = True) -> Path:
    """Every figure's way out: lay it out (``tight``), write it as a PNG at ``path`` (atomically, its folder made) and
    free it."""
    import matplotlib.pyplot as plt

    if tight:
        figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png")
    plt.close(figure)
    return path


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
    return save_figure(figure, path, tight=False)


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
    return save_figure(figure, path)


def roi_bars(values: dict[str, dict[str, float]], path: str | Path, title: str) -> Path:
    """Grouped bars: ``values[feature][roi]`` (mean r per ROI) for each feature space."""
    plt = _pyplot()
    rois = list(values[next(iter(values))])
    width = 0.8 / len(values)
    figure, ax = plt.subplots(figsize=(max(6, 1.1 * len(rois)), 4))
    for i, (name, per_roi) in enumerate(values.items()):
        ax.bar(np.arange(len(rois)) + i * width, [per_roi[r] for r in rois], width, label=name)
    ax.set_xticks(np.arange(len(rois)) + 0.4 - width / 2, rois, rotation=30, fontsize=8)
    ax.set_ylabel("mean test r")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(figure, path)


def group_rois(values: dict[str, dict[str, dict[str, float]]], path: str | Path, title: str) -> Path:
    """One panel per feature space: per ROI, a bar at the mean over subjects and a point for every subject.
    ``values[feature][roi][subject]`` is a subject's mean test r in that ROI."""
    plt = _pyplot()
    features = list(values)
    rois = list(values[features[0]])
    subjects = sorted({s for per_roi in values.values() for per_subject in per_roi.values() for s in per_subject})
    colours = dict(zip(subjects, plt.get_cmap("tab10").colors))
    figure, axes = plt.subplots(
        1, len(features), figsize=(max(4, 0.7 * len(rois)) * len(features), 4), squeeze=False, sharey=True
    )
    for ax, feature in zip(axes[0], features):
        x = np.arange(len(rois))
        ax.bar(x, [np.mean(list(values[feature][r].values())) for r in rois], 0.6, color="lightgray", label="mean")
        for k, subject in enumerate(subjects):
            jitter = (k - (len(subjects) - 1) / 2) * 0.6 / max(len(subjects), 1)
            ys = [values[feature][r].get(subject, np.nan) for r in rois]
            ax.plot(x + jitter, ys, "o", markersize=4, color=colours[subject], label=subject)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(x, rois, rotation=30, fontsize=8)
        ax.set_title(feature, fontsize=10)
    axes[0][0].set_ylabel("mean test r")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def group_lines(series: dict[str, dict[str, dict[float, float]]], path: str | Path, xlabel: str, title: str) -> Path:
    """One panel per ROI: mean r (y) against a swept setting (x) for every subject (thin) and their mean (thick).
    ``series[roi][subject]`` is ``{x: mean r}``."""
    plt = _pyplot()
    rois = list(series)
    subjects = sorted({s for per_subject in series.values() for s in per_subject})
    colours = dict(zip(subjects, plt.get_cmap("tab10").colors))
    n_cols = min(4, len(rois))
    n_rows = -(-len(rois) // n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.6 * n_rows + 0.6), squeeze=False, sharey=True)
    for ax in axes.ravel()[len(rois) :]:
        ax.axis("off")
    for ax, roi in zip(axes.ravel(), rois):
        xs = sorted({x for points in series[roi].values() for x in points})
        for subject in subjects:
            points = series[roi].get(subject, {})
            ax.plot(xs, [points.get(x, np.nan) for x in xs], marker="o", markersize=3, linewidth=1,
                    color=colours[subject], alpha=0.7, label=subject)  # fmt: skip
        mean = [np.nanmean([series[roi][s].get(x, np.nan) for s in series[roi]]) for x in xs]
        ax.plot(xs, mean, color="black", linewidth=2.5, label="mean")
        ax.set_title(roi, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
    for row in axes:
        row[0].set_ylabel("mean test r")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def winner_mosaic(winner: np.ndarray, brain: np.ndarray, names: Sequence[str], path: str | Path, title: str) -> Path:
    """Axial slices of a categorical (X, Y, Z) map: ``winner`` holds 1..len(names) (which name wins), NaN elsewhere."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

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
        ax.imshow(winner[:, :, k].T, cmap=ListedColormap(colours), vmin=0.5, vmax=len(names) + 0.5, origin="lower")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    figure.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8)
    figure.suptitle(title, fontsize=10)
    return save_figure(figure, path, tight=False)


# --- pycortex flatmaps ----------------------------------------------------------------------------------------

# (subject, its overlays file's mtime, height) -> the ROI outlines' RGBA texture
_ROI_TEXTURES: dict[tuple[str, int, int], np.ndarray] = {}


def _add_roi_outlines(ax, volume, height: int) -> None:
    """ROI outlines and labels over a flatmap. pycortex renders them through Inkscape, about a second a panel, and
    they depend only on the subject's overlays and the height: so they are rendered once and reused until the
    overlays file changes."""
    import cortex

    overlays = Path(cortex.db.get_paths(volume.subject)["overlays"])
    key = (volume.subject, overlays.stat().st_mtime_ns, height)
    if key in _ROI_TEXTURES:
        ax.imshow(_ROI_TEXTURES[key], aspect="equal", interpolation="bicubic", extent=ax.images[0].get_extent(),
                  label="rois", zorder=1000)  # fmt: skip
        return
    image = cortex.quickflat.composite.add_rois(
        ax, volume, height=height, with_labels=True, linewidth=5, linecolor="white", labelsize="16pt",
        labelcolor="white",
    )  # fmt: skip
    _ROI_TEXTURES[key] = image.get_array()


def flatmaps(
    panels: Sequence[tuple[str, np.ndarray]],
    space,
    path: str | Path,
    title: str = "",
    cmap: str = "hot",
    vmin: float = 0.0,
    vmax: float | None = None,
    label: str = "test r",
    categories: Sequence[str] = (),
    summary: dict[str, float] | None = None,
    n_cols: int = 2,
) -> Path:
    """(title, (X, Y, Z) volume) panels as pycortex flatmaps of ``space`` (a
    :class:`~brainldm.analysis.surfaces.CorticalSpace`).

    Each panel shows curvature, the values (NaN is not drawn) on one colour scale for all panels, and ROI
    outlines (when Inkscape, which pycortex renders them with, is installed). Below: one colour bar, or with
    ``categories`` a legend (value k names ``categories[k - 1]``). ``summary`` (ROI -> value) adds a bar chart
    beside a single panel. Saved as a PNG.
    """

    check_space(space)  # pycortex present, subject and transform in its database
    import cortex

    plt = _pyplot()
    if categories:
        from matplotlib.colors import ListedColormap

        colours = plt.get_cmap("tab10").colors[: len(categories)]
        cmap, vmin, vmax = ListedColormap(colours), 0.5, len(categories) + 0.5
    if vmax is None:
        finite = np.concatenate([v[np.isfinite(v)].ravel() for _, v in panels])
        vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
        vmax = vmax if vmax > vmin else vmin + 1.0
    n_cols = 1 if len(panels) == 1 else min(n_cols, len(panels))
    n_rows = -(-len(panels) // n_cols)
    # layout in inches: title on top, panels in a grid, the colour bar below, the ROI summary to the right
    panel_w, panel_h, top, bottom = 8.0, 4.3, 0.5, 1.0
    side = 3.5 if summary and len(panels) == 1 else 0.0
    fig_w, fig_h = n_cols * panel_w + side, top + n_rows * panel_h + bottom
    figure = plt.figure(figsize=(fig_w, fig_h))
    outlines = shutil.which("inkscape") is not None
    for i, (name, values) in enumerate(panels):
        row, col = divmod(i, n_cols)
        rect = (col * panel_w / fig_w, (bottom + (n_rows - 1 - row) * panel_h) / fig_h, panel_w / fig_w,
                (panel_h - 0.3) / fig_h)  # fmt: skip
        ax = figure.add_axes(rect)
        volume = cortex.Volume(
            np.asarray(values, dtype=np.float32).T, space.subject, space.transform, cmap=cmap, vmin=vmin, vmax=vmax
        )  # pycortex volumes are (Z, Y, X)
        cortex.quickflat.make_figure(
            volume, fig=ax, height=512, thick=8, with_curvature=True, with_colorbar=False, with_rois=False
        )
        if outlines:
            _add_roi_outlines(ax, volume, height=512)
        if len(panels) > 1:
            ax.set_title(name, fontsize=12)
    colour_axes = figure.add_axes((0.25 * n_cols * panel_w / fig_w, 0.55 / fig_h, 0.5 * n_cols * panel_w / fig_w,
                                   0.18 / fig_h))  # fmt: skip
    if categories:
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in cmap.colors]
        colour_axes.axis("off")
        colour_axes.legend(handles, categories, loc="center", ncol=len(categories), fontsize=11, frameon=False)
    else:
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(vmin, vmax))
        figure.colorbar(mappable, cax=colour_axes, orientation="horizontal", label=label)
    if side:
        ax = figure.add_axes(((panel_w + 1.1) / fig_w, (bottom + 0.6) / fig_h, (side - 1.4) / fig_w,
                              (panel_h - 1.2) / fig_h))  # fmt: skip
        names = list(summary)
        ax.barh(np.arange(len(names)), [summary[n] for n in names], color="tab:red")
        ax.set_yticks(np.arange(len(names)), names, fontsize=10)
        ax.invert_yaxis()
        ax.set_xlabel(f"mean {label} per ROI", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    figure.suptitle(title, fontsize=14, y=1 - 0.12 / fig_h, va="top")
    return save_figure(figure, path, dpi=80, tight=False)
