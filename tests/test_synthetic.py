"""The synthetic NSD tree reads back like NSD: formats, shapes, index bases, and planted responses."""

import json
import zipfile

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.io

from brainldm.data import coco, nsd
from brainldm.offline.synthetic import draw_picture, write_nsd_tree
from brainldm.offline.twins import TINY_CAPTION_WORDS


def test_expdesign_is_one_based_and_maps_trials_to_images(nsd_tree):
    design = scipy.io.loadmat(nsd.expdesign_path(nsd_tree.root))
    n_trials = nsd_tree.n_sessions * nsd_tree.trials_per_session
    masterordering, subjectim, sharedix = design["masterordering"], design["subjectim"], design["sharedix"]
    assert masterordering.shape == (1, nsd.DESIGN_SESSIONS * nsd_tree.trials_per_session)  # NSD's 40 sessions
    assert subjectim.shape[0] == 8
    assert sharedix.shape == (1, len(nsd_tree.shared))
    assert masterordering.min() == 1 and masterordering.max() == subjectim.shape[1]
    assert subjectim.min() >= 1 and subjectim.max() <= nsd_tree.n_images
    np.testing.assert_array_equal(sharedix[0] - 1, nsd_tree.shared)
    for s in nsd_tree.subjects:
        shown = subjectim[s - 1, masterordering[0, :n_trials].astype(int) - 1].astype(int) - 1
        np.testing.assert_array_equal(shown, nsd_tree.trial_images[s])  # the trials the betas hold
        # every subject sees every shared image; its other images are its own
        assert set(nsd_tree.shared) <= set(shown)
    others = [set(subjectim[s - 1]) - set(sharedix[0]) for s in range(1, 9)]
    assert all(not (a & b) for i, a in enumerate(others) for b in others[i + 1 :])


def test_stim_info_matches_expdesign(nsd_tree):
    info = pd.read_csv(nsd.stim_info_path(nsd_tree.root), index_col=0)
    assert len(info) == nsd_tree.n_images
    np.testing.assert_array_equal(info["nsdId"], np.arange(nsd_tree.n_images))
    np.testing.assert_array_equal(np.flatnonzero(info["shared1000"]), nsd_tree.shared)
    for s in nsd_tree.subjects:
        trials = nsd_tree.trial_images[s]
        for rep in range(3):
            column = info[f"subject{s}_rep{rep}"].to_numpy()
            shown = np.flatnonzero(column)
            # 1-based trial numbers that point back at the image
            np.testing.assert_array_equal(trials[column[shown] - 1], shown)
        assert set(np.flatnonzero(info[f"subject{s}"])) == set(trials)


def test_stimuli_are_natural_looking_uint8_pictures(nsd_tree):
    with h5py.File(nsd.stimuli_path(nsd_tree.root)) as f:
        brick = f["imgBrick"]
        assert brick.shape == (nsd_tree.n_images, 128, 128, 3)  # toy's output size
        assert brick.dtype == np.uint8
        images = brick[:20].astype(float)
    # smooth, not white noise: neighbouring pixels are strongly correlated; and they differ between images
    r = np.corrcoef(images[:, :, :-1].ravel(), images[:, :, 1:].ravel())[0, 1]
    assert r > 0.8
    assert images.std(axis=0).mean() > 20


def test_captions_cover_every_image_once_in_cocos_archive_not_in_nsds_tree(nsd_tree):
    info = pd.read_csv(nsd.stim_info_path(nsd_tree.root), index_col=0)
    assert not [p for p in nsd_tree.root.rglob("*") if "caption" in p.name or "annotations" in p.name]
    assert not nsd_tree.coco_archive.is_relative_to(nsd_tree.root)
    by_coco = {}
    archive = zipfile.ZipFile(nsd_tree.coco_archive)
    for split in coco.COCO_SPLITS:
        document = json.loads(archive.read(coco.caption_member(split)))
        assert {im["id"] for im in document["images"]} == set(info.loc[info.cocoSplit == split, "cocoId"])
        for annotation in document["annotations"]:
            by_coco.setdefault(annotation["image_id"], []).append(annotation["caption"])
    assert set(by_coco) == set(info.cocoId)
    for nsd_id in (0, 7, nsd_tree.n_images - 1):
        assert by_coco[info.cocoId[nsd_id]] == nsd_tree.captions[nsd_id]
        assert 4 <= len(nsd_tree.captions[nsd_id]) <= 5


def test_captions_use_only_the_tiny_captioners_words():
    # the tiny captioner (random BLIP) decodes the world's captions with a word-level tokenizer over these words
    rng = np.random.default_rng(0)
    words = {
        w
        for _ in range(200)
        for caption in draw_picture(rng, 32)[1]
        for w in caption.lower().replace(",", " , ").replace(".", " . ").replace(":", " : ").split()
    }
    assert words <= set(TINY_CAPTION_WORDS), sorted(words - set(TINY_CAPTION_WORDS))


def test_rois_are_nifti_with_minus_one_outside_the_brain(nsd_tree):
    general = nib.load(nsd.roi_path(nsd_tree.root, 1, "nsdgeneral"))
    streams = nib.load(nsd.roi_path(nsd_tree.root, 1, "streams"))
    assert general.shape == streams.shape == nsd_tree.grid_shape
    g, s = np.asarray(general.dataobj), np.asarray(streams.dataobj)
    assert set(np.unique(g)) == {-1, 0, 1}
    assert set(np.unique(s)) == set(range(-1, 8))
    np.testing.assert_array_equal(g == -1, s == -1)
    # the two masks overlap but neither contains the other, as in NSD
    assert ((g == 1) & (s == 0)).any() and ((g == 0) & (s > 0)).any()
    np.testing.assert_array_equal(np.argwhere(s == 1), nsd_tree.voxels[1]["early"])
    np.testing.assert_array_equal(np.argwhere(s == 5), nsd_tree.voxels[1]["ventral"])


def test_betas_are_int16_psc_times_300_and_hdf5_twin_is_reversed(nsd_tree):
    image = nib.load(nsd.betas_path(nsd_tree.root, 1, 2))
    assert image.shape == (*nsd_tree.grid_shape, nsd_tree.trials_per_session)
    assert image.get_data_dtype() == np.int16
    betas = np.asarray(image.dataobj)
    outside = np.asarray(nib.load(nsd.roi_path(nsd_tree.root, 1, "streams")).dataobj) == -1
    assert not betas[outside].any()
    assert 50 < betas[~outside].std() < 3000  # a few percent signal change, x 300
    with h5py.File(nsd.betas_path(nsd_tree.root, 1, 2, ".hdf5")) as f:
        np.testing.assert_array_equal(f["betas"][:], betas.transpose(3, 2, 1, 0))
        # NSD's layout: uncompressed, one chunk per voxel holding its trials, so a voxel is one byte range
        assert f["betas"].chunks == (nsd_tree.trials_per_session, 1, 1, 1)
        assert f["betas"].compression is None


def _responses(tree, subject, ijk):
    """(n_trials, n_voxels) percent signal change, z-scored within each session."""
    sessions = []
    for session in range(1, tree.n_sessions + 1):
        data = np.asarray(nib.load(nsd.betas_path(tree.root, subject, session)).dataobj)
        x = data[tuple(ijk.T)].T / nsd.BETAS_SCALE
        sessions.append((x - x.mean(0)) / x.std(0))
    return np.concatenate(sessions)


@pytest.mark.parametrize("name, roi", [("z", "early"), ("c", "ventral")])
def test_planted_responses_live_in_their_roi(nsd_tree, name, roi):
    subject = 2
    ijk = nsd_tree.voxels[subject][roi]
    measured = _responses(nsd_tree, subject, ijk)
    planted = nsd_tree.planted_signal(subject, nsd_tree.trial_images[subject], name)
    r = [np.corrcoef(measured[:, v], planted[:, v])[0, 1] for v in range(ijk.shape[0])]
    expected = np.sqrt(nsd_tree.snr / (1 + nsd_tree.snr))  # r of signal + noise with the signal
    assert np.median(r) > expected - 0.15
    # voxels of other ROIs carry no such signal
    other = np.argwhere(np.asarray(nib.load(nsd.roi_path(nsd_tree.root, subject, "streams")).dataobj) == 7)
    noise = _responses(nsd_tree, subject, other[: ijk.shape[0]])
    r_null = [np.corrcoef(noise[:, v], planted[:, v])[0, 1] for v in range(noise.shape[1])]
    assert abs(np.median(r_null)) < 0.15


def test_same_seed_writes_the_same_tree(tmp_path, tiny, nsd_tree):
    again = write_nsd_tree(tmp_path, subjects=(1, 2), write_hdf5=True, ldm=tiny, seed=0)
    for path in (nsd.betas_path(tmp_path, 2, 3), nsd.roi_path(tmp_path, 1, "streams")):
        reference = nsd_tree.root / path.relative_to(tmp_path)
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(reference).dataobj))
    np.testing.assert_array_equal(again.z, nsd_tree.z)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"subjects": (9,)}, "subjects must be in 1..8"),
        ({"grid_shape": (2, 2, 2)}, "too small"),
        ({"n_shared": 40}, "more images per subject"),
    ],
)
def test_bad_arguments_raise_clear_errors_and_write_nothing(tmp_path, tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_nsd_tree(tmp_path, ldm=tiny, **kwargs)
    assert not any(tmp_path.iterdir())
