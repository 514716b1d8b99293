#!/usr/bin/env python
"""How much of each picture's toy-CLIP identity z and c can carry on the offline world, and how much decoding keeps.

Builds an offline world (toy features, the default noise level), prepares subject 1, extracts z and c and fits the
maps, as the README's offline demo does. Then, on the test images, it makes Xz, Xc and Xzc from:

- the true z and c (what the LDM can do at best);
- the true features projected on their leading k principal components (fit on the training images): the planted
  voxels see the leading ``--world-components`` of them, so this is what a brain of this world can carry at most;
- the decoded z and c (what the maps recover),

and prints toy-CLIP 2-way identification and PixCorr of Xz, Xc and Xzc against the presented pictures (128 px). If
Xz from a few components already scores higher than Xc from the true c, no decoder can make Xc beat Xz on this
world's toy-CLIP.
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
    parser.add_argument("--sessions", type=cli.positive, default=6, help="(default 6, the README's offline demo)")
    parser.add_argument("--trials-per-session", type=cli.positive, default=45, help="(default 45)")
    parser.add_argument("--shared", type=cli.positive, default=20, help="test images (default 20)")
    parser.add_argument("--snr", type=cli.number(0, above=True), help="(default: the offline world's)")
    parser.add_argument("--world-components", type=cli.positive, default=32, help="(default 32, the world's)")
    parser.add_argument(
        "--components",
        type=cli.numbers(1),
        default=[2, 4, 8, 32],
        help="comma-separated numbers of components to project on (default 2,4,8,32)",
    )
    parser.add_argument("--steps", type=cli.positive, default=20, help="DDIM steps of Xc (default 20)")
    parser.add_argument("--seed", type=cli.integer(0, 2**32 - 1), default=0, help="world seed (default 0)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        run(Path(work), args)


def project(x: np.ndarray, train: np.ndarray, k: int) -> np.ndarray:
    """``x`` (n, ...) projected on the leading ``k`` principal components of ``train``, as the world's voxels see
    features (:func:`brainldm.synthetic.principal_components`)."""
    from brainldm.synthetic import principal_components

    mean, std, v = principal_components(train.reshape(len(train), -1), k)
    s = (x.reshape(len(x), -1) - mean) / std
    return ((s @ v @ v.T) * std + mean).reshape(x.shape).astype(np.float32)


def run(work: Path, args) -> None:
    import torch

    from brainldm.data import SubjectStimuli, load_trials
    from brainldm.evaluate import clip_extractor
    from brainldm.features import load_features
    from brainldm.ldm import load_ldm
    from brainldm.metrics import pixcorr, two_way_identification
    from brainldm.offline import build_offline_world
    from brainldm.presets import Sampling
    from brainldm.reconstruct import Reconstructor
    from brainldm.synthetic import OFFLINE_SNR

    ldm = load_ldm("toy", device="cpu")
    snr = args.snr or OFFLINE_SNR
    world = build_offline_world(
        work, ldm, "toy", n_sessions=args.sessions, trials_per_session=args.trials_per_session, n_shared=args.shared,
        snr=snr, n_components=args.world_components, seed=args.seed, progress=True,
    )  # fmt: skip
    maps = world.maps[1]
    stimuli = SubjectStimuli(work / "trials", 1)

    test = load_trials(work / "trials", 1, "test")
    test_ids = [int(i) for i in test["nsd_id"]]
    train_ids = sorted(set(stimuli.nsd_ids) - set(test_ids))
    pictures = np.stack([np.asarray(im.convert("RGB").resize((128, 128))) for im in test["image"]])
    true = {name: load_features(work / "features", name, test_ids) for name in ("z", "c")}
    train = {name: load_features(work / "features", name, train_ids) for name in ("z", "c")}
    decoded = {k: v.cpu().numpy() for k, v in maps.predict(np.asarray(test.with_format("numpy")["betas"])).items()}

    extract = clip_extractor(ldm.image_encoder)
    reference = extract(list(pictures))
    recon = Reconstructor(ldm)
    sampling = Sampling(num_inference_steps=args.steps)

    def scores(images: np.ndarray) -> str:
        clip_id = two_way_identification(extract(list(images)), reference).mean()
        return f"{100 * clip_id:5.1f}% | {np.mean([pixcorr(a, b) for a, b in zip(images, pictures)]):.3f}"

    sources = [("true", true["z"], true["c"])]
    for k in map(int, args.components):
        sources.append((f"{k} components", project(true["z"], train["z"], k), project(true["c"], train["c"], k)))
    sources.append(("decoded", decoded["z"], decoded["c"]))
    print(f"\n{len(test_ids)} test images, {len(train_ids)} training images, snr {snr}; toy-CLIP 2-way id | PixCorr\n")
    print("| z and c | Xz toy-CLIP | Xz PixCorr | Xc toy-CLIP | Xc PixCorr | Xzc toy-CLIP | Xzc PixCorr |")
    print("|---|---|---|---|---|---|---|")
    for name, z, c in sources:
        out = recon(torch.from_numpy(z), torch.from_numpy(c), sampling)
        print(f"| {name} | {scores(out.Xz)} | {scores(out.Xc[:, 0])} | {scores(out.Xzc[:, 0])} |")


if __name__ == "__main__":
    main()
