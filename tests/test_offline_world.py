"""The offline world shows what z and c each carry, as NSD does: Xz the layout and colour, Xc the meaning (which
animals), Xzc both. Measured on a small world decoded with toy, with and without rescaling; meaning by toy's CLIP
vision tower (see benchmarks/offline_ceilings.py for every measure on a larger world)."""

import numpy as np
import pytest
import torch

from brainldm.metrics import two_way_identification
from brainldm.offline.meaning import (
    CaptionWords,
    blur_to_grid,
    caption_words,
    mean_pairwise_correlation,
    reconstruction_scores,
)
from brainldm.offline.synthetic import ANIMALS, coat_pattern, draw_picture
from brainldm.offline.toy_parts import draw_pairs


@pytest.fixture(scope="module")
def reader_pairs():
    """Pictures of the world's kind that no test world shows, and their captions."""
    return draw_pairs(1500, seed=4321, size=128)


@pytest.fixture(scope="module")
def reader(reader_pairs):
    """The picture -> caption-words reader, fitted on :func:`reader_pairs`."""
    return CaptionWords().fit(*reader_pairs)


def test_captions_name_only_the_animals_in_correct_english():
    rng = np.random.default_rng(0)
    for _ in range(50):
        _, captions = draw_picture(rng, 32)
        for caption in captions:
            assert " an " not in f" {caption} " and " a a" not in caption  # every animal's name starts with a consonant
            words = {w.strip(".,:\n ").lower() for w in caption.split()}
            assert not words & {"red", "blue", "left", "right", "two", "three"}  # no colour, place or count


def test_every_coat_averages_to_the_same_colour_over_one_period():
    """A box blur over z's grid cell (one period) leaves nothing of the coat: the meaning is finer than z's grid."""
    yy, xx = np.mgrid[0:640, 0:640] / 640
    for kind in ANIMALS:
        coat = coat_pattern(kind, xx, yy, np.random.default_rng(1))
        cells = coat.reshape(10, 64, 10, 64).mean(axis=(1, 3))
        assert np.abs(cells).max() < 0.02, kind
        assert coat.std() > 0.5, kind  # while the coat itself is plain to see


def test_the_worlds_meaning_is_read_from_the_pictures_but_not_from_z_sized_blurs(reader, reader_pairs):
    pictures, captions = draw_pairs(400, seed=8765, size=128)
    words = caption_words(captions)
    originals = two_way_identification(reader.predict(pictures), words).mean()
    blurred = two_way_identification(reader.predict(blur_to_grid(pictures, 10)), words).mean()
    assert originals >= 0.9 and blurred <= 0.65, (originals, blurred)
    # even a reader fitted on blurred pictures cannot find the animals there
    train, train_captions = reader_pairs
    blur_reader = CaptionWords().fit(blur_to_grid(train, 10), train_captions)
    assert two_way_identification(blur_reader.predict(blur_to_grid(pictures, 10)), words).mean() <= 0.65


@pytest.fixture(scope="module")
def toy_reconstructions(offline_demo):
    """The offline demo's subject 1 (the default noise level) decoded with toy; Xz, Xc and Xzc of its 20 test images
    (10 DDIM steps, for speed), from the decoded z and c as fitted and rescaled (one factor per target)."""
    from pathlib import Path

    from brainldm.data.trials import load_trials
    from brainldm.decoding.maps import SubjectMaps
    from brainldm.ldm.loading import load_ldm
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.presets import Sampling

    ldm = load_ldm("toy", device="cpu")
    maps = SubjectMaps.from_pretrained(Path(offline_demo.maps) / "subj01")
    test = load_trials(offline_demo.data, 1, "test")
    pictures = np.stack([np.asarray(im.convert("RGB").resize((128, 128))) for im in test["image"]])
    betas = np.asarray(test.with_format("numpy")["betas"])
    recon = Reconstructor(ldm)
    out = {}
    for rescale in (None, "target"):
        decoded = maps.predict(betas, rescale=rescale)
        result = recon(decoded["z"], decoded["c"], Sampling(num_inference_steps=10), keys=list(test["nsd_id"]))
        out[rescale] = {"Xz": result.Xz, "Xc": result.Xc[:, 0], "Xzc": result.Xzc[:, 0]}
    return pictures, out, ldm


@pytest.mark.parametrize("rescale", [None, "target"])
def test_xz_carries_the_layout_xc_the_meaning_and_xzc_both(toy_reconstructions, reader, rescale):
    from brainldm.analysis.extractors import clip_extractor

    pictures, out, ldm = toy_reconstructions
    clip = clip_extractor(ldm.image_encoder)
    s = {kind: reconstruction_scores(images, pictures, reader, clip) for kind, images in out[rescale].items()}
    assert s["Xz"]["pixels"] >= s["Xc"]["pixels"] + 0.1, s  # Xz keeps the layout
    assert s["Xzc"]["pixels"] >= s["Xc"]["pixels"] + 0.1, s
    # meaning by toy's CLIP (the caption-words reader, fitted on crisp pictures, does not read toy's softer coats)
    assert s["Xc"]["clip"] >= s["Xz"]["clip"] + 0.12, s  # Xc keeps the meaning, which z cannot carry
    assert s["Xzc"]["clip"] >= s["Xz"]["clip"] + 0.12, s
    # Xzc carries both: within 5 points of the best on each, rescaled (the app's default). Measured at these 10 DDIM
    # steps: level with Xz by pixels; by CLIP under 1 point behind Xc, rescaled or not (at the paper's 50 steps on the
    # benchmark's four worlds: 1 and 2, README)
    behind = 0.05 if rescale else 0.12
    assert s["Xzc"]["pixels"] >= s["Xz"]["pixels"] - 0.05 and s["Xzc"]["clip"] >= s["Xc"]["clip"] - behind, s


def test_xc_varies_with_the_trial(toy_reconstructions):
    pictures, out, _ = toy_reconstructions
    assert mean_pairwise_correlation(out["target"]["Xc"]) <= mean_pairwise_correlation(pictures) + 0.1


def test_rescaling_restores_the_spread_of_decoded_z(toy_reconstructions):
    """Xz from rescaled z is less washed out: its pixels spread more, towards the pictures' own contrast."""
    pictures, out, _ = toy_reconstructions
    plain, rescaled = (torch.as_tensor(out[r]["Xz"], dtype=torch.float32).std() for r in (None, "target"))
    assert rescaled > plain
