"""The encoding job: a subject's encoding models of every feature space (:func:`run_encoding`), or a group's
(:func:`run_group_encoding`), from the trials dataset and the feature stores, written as r maps (NIfTI), summaries
(JSON, CSV) and figures with their captions. The computation is :mod:`brainldm.analysis.encoding`'s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brainldm.analysis import viz
from brainldm.analysis.encoding import MIN_TEST_IMAGES, EncodingResult, fit_encoding, group_summary
from brainldm.analysis.surfaces import check_space
from brainldm.data.features import UNET_BLOCKS, FeatureSpec, FeatureStore
from brainldm.data.trials import load_trials, load_voxels
from brainldm.paths import atomic_path, subject_name
from brainldm.presets import TAKAGI2023
from brainldm.validation import InputError

GROUP_SUMMARY, GROUP_FIGURE = "group_summary.json", "group_rois.png"
CAPTIONS_FILE = "captions.json"  # each figure's caption, beside the figures
SIGNIFICANT = "where q < 0.05 after FDR correction"


def run_encoding(
    data: str | Path,
    features: str | Path,
    subject: int,
    names: Sequence[str],
    out: str | Path,
    whole_brain: bool = True,
    n_components: int = TAKAGI2023.n_pca,
    alphas: Sequence[float] = TAKAGI2023.alphas,
    cv: int = TAKAGI2023.cv_folds,
    q: float = TAKAGI2023.fdr_q,
    device=None,
    progress: bool = True,
    space=None,
) -> dict[str, EncodingResult]:
    """Encoding models of every feature space in ``names`` for one subject; writes maps, summaries and figures.

    Writes into ``out``: ``r_<feature>.nii.gz`` (r where FDR-significant, 0 elsewhere), ``summary.json`` and
    ``summary.csv`` (per feature and ROI), and PNG figures (:func:`write_figures`; flatmaps too when ``space``, a
    :class:`~brainldm.analysis.surfaces.CorticalSpace`, is given). Uses the whole-brain dataset when ``whole_brain``
    (``scripts/prepare_nsd.py --whole-brain``), else the stored ROI voxels.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    voxels = load_voxels(data, subject, whole_brain)
    train = load_trials(data, subject, "train", whole_brain).select_columns(["nsd_id", "betas"]).with_format("numpy")
    test = load_trials(data, subject, "test", whole_brain).select_columns(["nsd_id", "betas"]).with_format("numpy")
    train_ids, test_ids = np.asarray(train["nsd_id"]), np.asarray(test["nsd_id"])
    if len(test_ids) < MIN_TEST_IMAGES:
        raise InputError(
            f"subject {subject} has {len(test_ids)} test images; encoding needs at least {MIN_TEST_IMAGES}"
        )
    train_betas, test_betas = np.asarray(train["betas"]), np.asarray(test["betas"])
    stores = {name: FeatureStore(features, name) for name in names}  # fails early on a missing feature space
    if space is not None:
        check_space(space, voxels.grid_shape)  # before the long work, not after it

    results = {}
    for name in tqdm(names, desc="encoding", unit="feature", disable=not progress):
        blocks = stores[name].blocks(np.unique(train_ids), test_ids)  # a block at a time: a space of any width fits
        results[name] = fit_encoding(
            blocks, train_betas, train_ids, test_betas, voxels.streams, voxels.roi_names, feature=name,
            n_components=n_components, alphas=alphas, cv=cv, q=q, device=device,
        )  # fmt: skip
    write_results(results, voxels, out, space)
    return results


def run_group_encoding(
    data: str | Path,
    features: str | Path,
    subjects: Sequence[int],
    names: Sequence[str],
    out: str | Path,
    spaces: dict | None = None,
    whole_brain: bool = True,
    **kwargs,
) -> dict[int, dict[str, EncodingResult]]:
    """:func:`run_encoding` for every subject into ``out/subjNN`` (``spaces``: subject -> its
    :class:`~brainldm.analysis.surfaces.CorticalSpace`, for flatmaps on each subject's own surface), then the group
    summary across them in ``out`` (:func:`write_group_summary`). Returns subject -> feature -> result."""

    spaces = spaces or {}
    for subject, space in spaces.items():  # every subject's surface checked before the long work
        check_space(space, load_voxels(data, subject, whole_brain).grid_shape)
    results = {}
    for subject in subjects:
        folder = Path(out) / subject_name(subject)
        results[subject] = run_encoding(
            data, features, subject, names, folder, whole_brain=whole_brain, space=spaces.get(subject), **kwargs
        )
    write_group_summary(results, out)
    return results


def write_group_summary(results: dict[int, dict[str, EncodingResult]], out: str | Path) -> list[Path]:
    """``group_summary.json`` (:func:`group_summary`), ``group_rois.png`` (per ROI and feature space, the mean over
    subjects with every subject shown) and ``group_<sweep>.png`` for each sweep :func:`figure_plan` finds in the
    feature spaces (each subject's line and their mean, ROI by ROI) in ``out``, with their captions
    (:func:`write_captions`); returns the summary's and the figures' paths."""

    out = Path(out)
    summary = group_summary(results)
    with atomic_path(out / GROUP_SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    values = {
        name: {roi: {s: v["mean_r"] for s, v in entry["subjects"].items()} for roi, entry in per_roi.items()
               if roi != "unknown"}
        for name, per_roi in summary.items()
    }  # fmt: skip
    title = f"encoding accuracy per ROI, {len(results)} subjects (bars: mean over subjects; points: each subject)"
    figures = {
        viz.group_rois(values, out / GROUP_FIGURE, title): (
            "mean test r per ROI for each feature space (bars: the mean over subjects; points: each subject)"
        )
    }
    # the sweeps (noise levels, denoising steps, U-Net layers), every subject's line and their mean, ROI by ROI
    for stem, (heading, xlabel, members, varies) in figure_plan(list(summary)).items():
        if stem == "compare":
            continue
        rois = values[next(iter(members))]
        series = {roi: {s: {x: values[n][roi][s] for n, x in members.items()} for s in rois[roi]} for roi in rois}
        title = f"{heading}, {len(results)} subjects (thin: each subject; thick: their mean)"
        path = viz.group_lines(series, out / f"group_{stem}.png", xlabel, title)
        figures[path] = f"test r per ROI as {varies} varies (thin lines: each subject; thick: their mean)"
    write_captions(figures, out)
    return [out / GROUP_SUMMARY, *figures]


def write_results(results: dict[str, EncodingResult], voxels, out: str | Path, space=None) -> list[Path]:
    """r maps (NIfTI), summary.json / summary.csv and the figures (:func:`write_figures`); returns the figure paths."""
    import nibabel as nib
    import pandas as pd

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, result in results.items():
        volume = voxels.to_volume(np.where(result.significant, result.r, 0.0), fill=0.0)
        nib.save(nib.Nifti1Image(volume, voxels.affine), out / f"r_{safe_name(name)}.nii.gz")
        for roi, stats in result.rois.items():
            rows.append({"feature": name, "roi": roi, **stats})
    summary = {
        name: {
            "n_components": res.n_components,
            "n_test": res.n_test,
            "mean_r": float(res.r.mean()),
            "fraction_significant": float(res.significant.mean()),
            "rois": res.rois,
        }
        for name, res in results.items()
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)
    return write_figures(results, voxels, out, space)


def figure_plan(names: Sequence[str]) -> dict[str, tuple[str, str, dict[str, float], str]]:
    """The paper's comparisons that the feature spaces in ``names`` allow.

    Returns file stem -> (title, x label, {feature: x}, what varies, in words): z, c and zc compared (x = order), zc
    across noise levels (x = strength), each U-Net block across denoising steps (x = step) and the U-Net blocks at
    each (strength, step) (x = depth).
    """

    specs = {name: FeatureSpec.parse(name) for name in names}
    plan = {}
    main = [n for n, s in specs.items() if s.kind in ("z", "c", "zc")]
    if len(main) >= 2:
        plan["compare"] = (" vs ".join(main), "", {n: i for i, n in enumerate(main)}, "the feature space")
    noise = {n: s.strength for n, s in specs.items() if s.kind == "zc"}
    if len(noise) >= 2:
        plan["sweep_noise"] = ("zc across noise levels", "strength (noise level)", noise, "the noise level of zc")
    unet = {n: s for n, s in specs.items() if s.kind == "unet"}
    for block in sorted({s.block for s in unet.values()}):
        for strength in sorted({s.strength for s in unet.values()}):
            steps = {n: s.step for n, s in unet.items() if s.block == block and s.strength == strength}
            if len(steps) >= 2:
                plan[f"sweep_steps_{block}_{strength:g}"] = (
                    f"U-Net {block} across denoising steps",
                    "denoising step",
                    steps,
                    "the denoising step",
                )
    depth = {b: i for i, b in enumerate(UNET_BLOCKS)}
    for strength, step in sorted({(s.strength, s.step) for s in unet.values()}):
        blocks = {n: depth[s.block] for n, s in unet.items() if (s.strength, s.step) == (strength, step)}
        if len(blocks) >= 2:
            title = f"U-Net layers (strength {strength:g}, step {step})"
            plan[f"sweep_layers_{strength:g}_{step}"] = (
                title,
                "U-Net block (down0 ... up3)",
                blocks,
                "the U-Net layer",
            )
    return plan


def write_figures(results: dict[str, EncodingResult], voxels, out: str | Path, space=None) -> list[Path]:
    """The r map of each feature space and the paper's comparisons (:func:`figure_plan`), as PNGs in ``out``.

    Comparisons are also drawn as ROI plots. Maps are volume slices (``map_<feature>.png``), or with ``space`` (the
    :class:`~brainldm.analysis.surfaces.CorticalSpace` of the voxels' grid) pycortex flatmaps: one panel per feature of
    each comparison (``flatmap_<comparison>.png``, plus the best feature per voxel for z vs c vs zc), and
    ``flatmap_<feature>.png`` with its ROI summary for a feature in no comparison.
    """

    out = Path(out)
    brain = np.zeros(voxels.grid_shape, dtype=float)
    brain[tuple(voxels.ijk.T)] = 1

    def significant_r(name: str) -> np.ndarray:
        return voxels.to_volume(np.where(results[name].significant, results[name].r, np.nan))

    def per_roi(name: str) -> dict[str, float]:
        return {roi: stats["mean_r"] for roi, stats in results[name].rois.items() if roi != "unknown"}

    def title(name: str) -> str:
        result = results[name]
        return f"{name}: test r where FDR q <= {result.q:g} ({result.significant.sum()} of {len(result.r)} voxels)"

    figures = {}  # path -> caption: what the app shows under each figure
    plan = figure_plan(list(results))
    compared = {name for _, _, members, _ in plan.values() for name in members}
    for name in results:
        if space is None:
            path = viz.volume_mosaic(significant_r(name), brain, out / f"map_{safe_name(name)}.png", title(name))
            figures[path] = f"test r of {name} in slices through the volume, {SIGNIFICANT}"
        elif name not in compared:
            path = out / f"flatmap_{safe_name(name)}.png"
            path = viz.flatmaps([(name, significant_r(name))], space, path, title(name), summary=per_roi(name))
            figures[path] = f"test r of {name} on the flattened cortex, {SIGNIFICANT}"
    vmax = max(float(np.percentile(r.r, 99.9)) for r in results.values())
    for stem, (heading, xlabel, members, varies) in plan.items():
        ordered = sorted(members, key=members.get)
        if stem == "compare":
            r = np.stack([results[n].r for n in ordered])
            significant = np.stack([results[n].significant for n in ordered]).any(0)
            winner = voxels.to_volume(np.where(significant, r.argmax(0) + 1.0, np.nan))
            best = "best-predicting feature per voxel (significant voxels)"
            path = viz.roi_bars({n: per_roi(n) for n in ordered}, out / "compare_rois.png", heading)
            figures[path] = "mean test r per ROI for each feature space"
            if space is None:
                path = viz.winner_mosaic(winner, brain, ordered, out / "compare_winner.png", best)
            else:
                path = out / "flatmap_compare_winner.png"
                path = viz.flatmaps([(best, winner)], space, path, best, categories=ordered)
            figures[path] = f"which feature space predicts each voxel best, {SIGNIFICANT}"
            on_cortex = f"test r of each feature space on the flattened cortex, {SIGNIFICANT}"
        else:
            rois = per_roi(ordered[0])
            series = {roi: {members[n]: per_roi(n)[roi] for n in ordered} for roi in rois}
            figures[viz.roi_lines(series, out / f"{stem}.png", xlabel, heading)] = f"test r as {varies} varies per ROI"
            on_cortex = f"test r as {varies} varies, on the flattened cortex, {SIGNIFICANT}"
        if space is not None:
            panels = [(title(n), significant_r(n)) for n in ordered]
            figures[viz.flatmaps(panels, space, out / f"flatmap_{stem}.png", heading, vmax=vmax)] = on_cortex
    write_captions(figures, out)
    return list(figures)


def write_captions(figures: dict[Path, str], out: str | Path) -> Path:
    """Add each figure's caption (file name -> one sentence in plain words) to ``captions.json`` in ``out``, beside
    the figures, where the app reads them (:func:`read_captions`)."""
    path = Path(out) / CAPTIONS_FILE
    captions = read_captions(out)
    captions.update({Path(figure).name: caption for figure, caption in figures.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(captions, indent=2))
    return path


def read_captions(folder: str | Path) -> dict[str, str]:
    """The captions :func:`write_captions` wrote in ``folder`` (file name -> caption); empty if none."""
    path = Path(folder) / CAPTIONS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def safe_name(feature: str) -> str:
    """A feature name as a file name: ``zc@0.5`` -> ``zc-0.5``, ``unet.mid@0.8#10`` -> ``unet.mid-0.8-step10``."""
    return feature.replace("@", "-").replace("#", "-step")
