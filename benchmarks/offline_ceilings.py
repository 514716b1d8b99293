#!/usr/bin/env python
"""What z and c each carry on the offline world, from true features to decoded ones, with and without rescaling.

Builds an offline world (toy features, the default noise level, a seed of your choice), prepares subject 1, extracts z
and c and fits the maps, as the offline demo of docs/offline-world.md does. Then, on the test images, it makes Xz, Xc
and Xzc (the paper's settings: strength 0.8, guidance 5, 50 DDIM steps, seed 42; each image its own noise) from:

- the true z and c (what the LDM can do at best);
- the true features projected on their leading k principal components (``--components``; the world's voxels see the
  leading ``--world-components``, so that is what a brain of this world can carry at most);
- the decoded z and c, as fitted (the paper) and rescaled to the training spread (per dimension, per target).

For each it prints 2-way identification of Xz, Xc and Xzc against the presented pictures (chance 50%) by pixels, by
colour histograms, by meaning (the animals a picture -> caption-words reader sees, :mod:`brainldm.offline.meaning`) and
by toy-CLIP, PixCorr, and how alike different trials' Xc are (mean pairwise r, beside the presented pictures'). First it
checks the world itself: the reader names held-out pictures' animals from the originals, and not from the same pictures
blurred to z's grid.

With several ``--seeds`` it does all that on one world per seed, then prints the mean over the worlds: on 24 test
images one image moves a 2-way figure by up to 4 points, and worlds differ by more.

    python benchmarks/offline_ceilings.py --seeds 7,11,13,17 --trials-per-session 60 --shared 24
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from brainldm import cli


@cli.script
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=cli.positive, default=6, help="(default 6, the offline demo's)")
    parser.add_argument("--trials-per-session", type=cli.positive, default=45, help="(default 45)")
    parser.add_argument("--shared", type=cli.positive, default=20, help="test images (default 20)")
    parser.add_argument("--snr", type=cli.number(0, above=True), help="(default: the offline world's)")
    parser.add_argument("--world-components", type=cli.positive, default=32, help="(default 32, the world's)")
    parser.add_argument(
        "--components",
        type=cli.numbers(1),
        default=[],
        help="comma-separated numbers of components to project the true features on (default: none)",
    )
    parser.add_argument("--steps", type=cli.positive, default=50, help="DDIM steps (default 50, the paper's)")
    parser.add_argument("--reader-pictures", type=cli.positive, default=3000, help="(default 3000)")
    parser.add_argument(
        "--seeds", type=cli.integers(0), default=[0], help="comma-separated world seeds, one world each (default 0)"
    )
    args = parser.parse_args(argv)
    worlds = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as work:
            worlds.append(run(Path(work), args, seed))
    if len(worlds) > 1:
        print(f"\nthe mean over {len(worlds)} worlds (seeds {', '.join(map(str, args.seeds))})\n")
        rows = {name: _mean([w[name] for w, _ in worlds]) for name in worlds[0][0]}
        print_table(rows, float(np.mean([presented for _, presented in worlds])))


def _mean(rows: list[dict]) -> dict:
    """The mean of several worlds' scores of one row (numbers, or dicts of numbers, under the same keys)."""
    mean = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            mean[key] = {k: float(np.mean([row[key][k] for row in rows])) for k in value}
        else:
            mean[key] = float(np.mean([row[key] for row in rows]))
    return mean


def print_table(rows: dict[str, dict], presented: float) -> None:
    """One row per source of z and c: each image kind's 2-way identifications and PixCorr, and Xc's pairwise r;
    then ``presented``, the presented pictures' pairwise r."""
    print("| z and c | Xz | Xc | Xzc | Xc pairwise r |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        cells = []
        for kind in ("Xz", "Xc", "Xzc"):
            ids = " / ".join(f"{100 * row[kind][k]:.0f}" for k in ("pixels", "colour", "words", "clip"))
            cells.append(f"{ids}; {row[kind]['pixcorr']:.3f}")
        print(f"| {name} | {' | '.join(cells)} | {row['pairwise']:.2f} |")
    print(f"\npresented pictures' pairwise r: {presented:.2f}")


def project(x: np.ndarray, train: np.ndarray, k: int) -> np.ndarray:
    """``x`` (n, ...) projected on the leading ``k`` principal components of ``train``, as the world's voxels see
    features (:func:`brainldm.offline.synthetic.principal_components`)."""
    from brainldm.offline.synthetic import principal_components

    mean, std, v = principal_components(train.reshape(len(train), -1), k)
    s = (x.reshape(len(x), -1) - mean) / std
    return ((s @ v @ v.T) * std + mean).reshape(x.shape).astype(np.float32)


def run(work: Path, args, seed: int) -> tuple[dict[str, dict], float]:
    """One world: its check, then its table, printed and returned (source -> Xz/Xc/Xzc scores and Xc's pairwise r;
    the presented pictures' pairwise r)."""
    import torch

    from brainldm.analysis.extractors import clip_extractor
    from brainldm.data.features import load_features
    from brainldm.data.trials import SubjectStimuli, load_trials
    from brainldm.ldm.loading import load_ldm
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.metrics import two_way_identification
    from brainldm.offline.meaning import (
        CaptionWords,
        blur_to_grid,
        caption_words,
        mean_pairwise_correlation,
        reconstruction_scores,
    )
    from brainldm.offline.synthetic import OFFLINE_SNR
    from brainldm.offline.toy_parts import draw_pairs
    from brainldm.offline.world import build_offline_world
    from brainldm.presets import TAKAGI2023, Sampling

    ldm = load_ldm("toy", device="cpu")
    snr = args.snr or OFFLINE_SNR
    world = build_offline_world(
        work, ldm, "toy", n_sessions=args.sessions, trials_per_session=args.trials_per_session, n_shared=args.shared,
        snr=snr, n_components=args.world_components, seed=seed, progress=True,
    )  # fmt: skip
    maps = world.maps[1]
    stimuli = SubjectStimuli(work / "trials", 1)
    test = load_trials(work / "trials", 1, "test")
    test_ids = [int(i) for i in test["nsd_id"]]
    train_ids = sorted(set(stimuli.nsd_ids) - set(test_ids))
    pictures = np.stack([np.asarray(im.convert("RGB").resize((128, 128))) for im in test["image"]])
    true = {name: load_features(work / "features", name, test_ids) for name in ("z", "c")}
    train = {name: load_features(work / "features", name, train_ids) for name in ("z", "c")}
    betas = np.asarray(test.with_format("numpy")["betas"])

    # the reader, fitted on pictures of the world's kind that the world never shows (another seed)
    drawn, captions = draw_pairs(args.reader_pictures + 500, seed=seed + 12345, size=128)
    reader = CaptionWords().fit(drawn[500:], captions[500:])
    grid = true["z"].shape[-1]
    held = caption_words(captions[:500])
    print(f"\nthe world: caption words of 500 held-out pictures, 2-way identification (chance 50%), reader fitted on "
          f"{args.reader_pictures} others")  # fmt: skip
    for name, seen in (
        ("originals", drawn[:500]),
        (f"blurred to z's {grid} x {grid} grid", blur_to_grid(drawn[:500], grid)),
    ):
        print(f"  from the {name}: {100 * two_way_identification(reader.predict(seen), held).mean():.1f}%")

    clip = clip_extractor(ldm.image_encoder)
    recon = Reconstructor(ldm)
    sampling = Sampling(num_inference_steps=args.steps)
    sources = [("true", true["z"], true["c"])]
    for k in map(int, args.components):
        sources.append((f"{k} components", project(true["z"], train["z"], k), project(true["c"], train["c"], k)))
    for rescale in (None, "dimension", "target"):
        decoded = {k: v.cpu().numpy() for k, v in maps.predict(betas, rescale=rescale).items()}
        label = "decoded" + ("" if rescale is None else f", rescaled per {rescale}")
        sources.append((label, decoded["z"], decoded["c"]))

    print(
        f"\n{len(test_ids)} test images, {len(train_ids)} training images, snr {snr}, seed {seed}; strength "
        f"{sampling.strength}, guidance {sampling.guidance_scale}, {sampling.num_inference_steps} DDIM steps, seed "
        f"{sampling.seed} (TAKAGI2023: {TAKAGI2023.sampling == sampling})\n2-way identification (chance 50%) by "
        "pixels / colour / meaning (caption words) / toy-CLIP, then PixCorr\n"
    )
    rows = {}
    for name, z, c in sources:
        out = recon(torch.from_numpy(z), torch.from_numpy(c), sampling, keys=test_ids)
        images = {"Xz": out.Xz, "Xc": out.Xc[:, 0], "Xzc": out.Xzc[:, 0]}
        rows[name] = {kind: reconstruction_scores(x, pictures, reader, clip) for kind, x in images.items()}
        rows[name]["pairwise"] = mean_pairwise_correlation(out.Xc[:, 0])
    presented = mean_pairwise_correlation(pictures)
    print_table(rows, presented)
    return rows, presented


if __name__ == "__main__":
    main()
