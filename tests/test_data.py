"""prepare_subject turns raw NSD files into the trials dataset: mapping, averaging, z-scoring, resume, errors."""

import gzip
import json
import shutil
import zipfile

import datasets
import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brainldm.data import coco, nsd
from brainldm.data import trials as data
from brainldm.data.trials import load_trials, load_voxels, prepare_subject
from brainldm.offline.synthetic import write_nsd_tree
from brainldm.validation import InputError


def _expected_betas(tree, subject, ijk, sessions, zscore=True):
    """(n_trials, n_voxels) read straight from the NIfTIs: int16 / 300, z-scored per voxel within each session."""
    out = []
    for s in range(1, sessions + 1):
        x = np.asarray(nib.load(nsd.betas_path(tree.root, subject, s)).dataobj)[tuple(ijk.T)].T / 300.0
        if zscore:
            std = x.std(0)
            x = (x - x.mean(0)) / np.where(std > 0, std, 1)
        out.append(x)
    return np.concatenate(out)


@pytest.fixture(scope="module")
def prepared(nsd_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("trials")
    prepare_subject(nsd_tree.root, 2, out, progress=False, coco_annotations=nsd_tree.coco_archive)
    return out


def test_train_rows_are_single_trials_of_non_shared_images(nsd_tree, prepared):
    train = load_trials(prepared, 2, "train")
    images = nsd_tree.trial_images[2]
    expected = [t for t in range(len(images)) if images[t] not in nsd_tree.shared]
    assert [row[0] - 1 for row in train["trials"]] == expected
    np.testing.assert_array_equal(train["nsd_id"], images[expected])
    assert set(train["n_reps"]) == {1}
    voxels = load_voxels(prepared, 2)
    truth = _expected_betas(nsd_tree, 2, voxels.ijk, nsd_tree.n_sessions)[expected]
    np.testing.assert_allclose(np.asarray(train.with_format("numpy")["betas"]), truth, atol=1e-5)


def test_test_rows_average_each_shared_image_over_its_repetitions(nsd_tree, prepared):
    test = load_trials(prepared, 2, "test")
    images = nsd_tree.trial_images[2]
    assert list(test["nsd_id"]) == sorted(nsd_tree.shared)
    voxels = load_voxels(prepared, 2)
    all_betas = _expected_betas(nsd_tree, 2, voxels.ijk, nsd_tree.n_sessions)
    betas = np.asarray(test.with_format("numpy")["betas"])
    for row, nsd_id in enumerate(test["nsd_id"]):
        trials = np.flatnonzero(images == nsd_id)
        assert test[row]["trials"] == (trials + 1).tolist()
        assert test[row]["n_reps"] == len(trials)
        assert test[row]["sessions"] == (trials // nsd_tree.trials_per_session + 1).tolist()
        np.testing.assert_allclose(betas[row], all_betas[trials].mean(0), atol=1e-5)


def test_a_dataset_prepared_before_the_sessions_column_still_loads(prepared, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    shutil.copytree(prepared / "subj02", tmp_path / "subj02")
    for path in (tmp_path / "subj02").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["sessions"]), path)
    old = load_trials(tmp_path, 2, "test")
    assert "sessions" not in old.column_names
    assert old["nsd_id"] == load_trials(prepared, 2, "test")["nsd_id"]


def test_fewer_sessions_give_partial_repetitions(nsd_tree, tmp_path):
    prepare_subject(nsd_tree.root, 1, tmp_path, sessions=1, progress=False, coco_annotations=nsd_tree.coco_archive)
    test = load_trials(tmp_path, 1, "test")
    first = nsd_tree.trial_images[1][: nsd_tree.trials_per_session]
    counts = {i: int((first == i).sum()) for i in nsd_tree.shared if (first == i).any()}
    assert dict(zip(test["nsd_id"], test["n_reps"])) == counts
    assert min(counts.values()) < 3  # the case the issue asks for is really exercised
    assert len(load_trials(tmp_path, 1, "train")) == sum(i not in nsd_tree.shared for i in first)


def test_voxel_table_holds_nsdgeneral_or_streams_voxels(nsd_tree, prepared):
    voxels = load_voxels(prepared, 2)
    g = np.asarray(nib.load(nsd.roi_path(nsd_tree.root, 2, "nsdgeneral")).dataobj)
    s = np.asarray(nib.load(nsd.roi_path(nsd_tree.root, 2, "streams")).dataobj)
    np.testing.assert_array_equal(voxels.ijk, np.argwhere((g == 1) | (s > 0)))
    assert voxels.grid_shape == nsd_tree.grid_shape
    np.testing.assert_array_equal(voxels.nsdgeneral, g[tuple(voxels.ijk.T)] == 1)
    np.testing.assert_array_equal(voxels.streams, s[tuple(voxels.ijk.T)])
    np.testing.assert_array_equal(voxels.ijk[voxels.roi("early")], nsd_tree.voxels[2]["early"])
    np.testing.assert_array_equal(voxels.affine, nib.load(nsd.roi_path(nsd_tree.root, 2, "streams")).affine)
    assert len(load_trials(prepared, 2, "test")[0]["betas"]) == len(voxels)


def test_images_and_captions_are_the_stimulus_and_its_coco_captions(nsd_tree, prepared):
    test = load_trials(prepared, 2, "test")
    row = test[1]
    with h5py.File(nsd.stimuli_path(nsd_tree.root)) as f:
        stored = f["imgBrick"][row["nsd_id"]]
    assert isinstance(row["image"], Image.Image)
    np.testing.assert_array_equal(np.asarray(row["image"]), stored)
    assert row["captions"] == [c.strip() for c in nsd_tree.captions[row["nsd_id"]]]


def test_dataset_loads_with_plain_datasets_load_dataset(prepared):
    test = datasets.load_dataset(str(prepared), "subj02", split="test")
    assert len(test) == len(load_trials(prepared, 2, "test"))
    assert test.features["image"] == datasets.Image()


def test_zscore_is_per_session_and_a_dead_voxel_gives_zero(tmp_path, tiny):
    tree = write_nsd_tree(tmp_path / "nsd", n_sessions=2, trials_per_session=24, n_shared=4, ldm=tiny, seed=3)
    path = nsd.betas_path(tree.root, 1, 2)
    image = nib.load(path)
    values = np.asarray(image.dataobj).copy()
    dead = tree.voxels[1]["early"][0]
    values[tuple(dead)] = 123  # constant within session 2
    nib.save(nib.Nifti1Image(values, image.affine), path)
    prepare_subject(tree.root, 1, tmp_path / "z", progress=False, coco_annotations=tree.coco_archive)
    prepare_subject(tree.root, 1, tmp_path / "raw", zscore=False, progress=False, coco_annotations=tree.coco_archive)
    voxels = load_voxels(tmp_path / "z", 1)
    column = int(np.flatnonzero((voxels.ijk == dead).all(1))[0])
    train = load_trials(tmp_path / "z", 1, "train").with_format("numpy")
    z = np.asarray(train["betas"])
    sessions = (np.array([t[0] for t in train["trials"]]) - 1) // 24
    assert np.isfinite(z).all()
    np.testing.assert_array_equal(z[sessions == 1, column], 0.0)
    raw = np.asarray(load_trials(tmp_path / "raw", 1, "train").with_format("numpy")["betas"])
    np.testing.assert_allclose(raw[sessions == 1, column], 123 / 300, rtol=1e-6)
    full = _expected_betas(tree, 1, voxels.ijk, 2)
    rows = np.array([t[0] for t in train["trials"]]) - 1
    np.testing.assert_allclose(z, full[rows], atol=1e-5)


def _copy_as_a_user_has_it(nsd_tree, copy):
    """A local copy of the tree with COCO's captions where nsd_access unpacks COCO's archive, as users have them."""
    shutil.copytree(nsd_tree.root, copy)
    with zipfile.ZipFile(nsd_tree.coco_archive) as archive:
        archive.extractall(copy / coco.NSD_ANNOTATIONS.rsplit("/", 1)[0])


def test_hdf5_twin_gives_the_same_betas(tmp_path, tiny, nsd_tree):
    # nsd_tree has .hdf5 twins; remove them in a copy and compare
    copy = tmp_path / "nsd"
    _copy_as_a_user_has_it(nsd_tree, copy)
    for path in copy.rglob("betas_session*.hdf5"):
        path.unlink()
    prepare_subject(copy, 1, tmp_path / "nii", progress=False)
    prepare_subject(nsd_tree.root, 1, tmp_path / "h5", progress=False, coco_annotations=nsd_tree.coco_archive)
    a = np.asarray(load_trials(tmp_path / "nii", 1, "train").with_format("numpy")["betas"])
    b = np.asarray(load_trials(tmp_path / "h5", 1, "train").with_format("numpy")["betas"])
    np.testing.assert_array_equal(a, b)


def test_killed_run_resumes_without_redoing_finished_sessions(nsd_tree, tmp_path, monkeypatch):
    calls = []
    real_read = nsd.read_betas

    def dying_read(root, subject, session, ijk):
        calls.append(session)
        if session == 3:
            raise KeyboardInterrupt  # the run is killed while reading session 3
        return real_read(root, subject, session, ijk)

    monkeypatch.setattr(nsd, "read_betas", dying_read)
    with pytest.raises(KeyboardInterrupt):
        prepare_subject(nsd_tree.root, 1, tmp_path, progress=False, coco_annotations=nsd_tree.coco_archive)
    assert not (tmp_path / "subj01").exists()  # the subject folder appears only when complete

    calls.clear()
    monkeypatch.setattr(nsd, "read_betas", lambda *a: (calls.append(a[2]), real_read(*a))[1])
    prepare_subject(nsd_tree.root, 1, tmp_path, progress=False, coco_annotations=nsd_tree.coco_archive)
    assert calls == [3]
    assert (tmp_path / "subj01" / "info.json").exists()
    assert not list(tmp_path.glob(".subj01*"))
    with pytest.raises(InputError, match="already exists"):
        prepare_subject(nsd_tree.root, 1, tmp_path, progress=False, coco_annotations=nsd_tree.coco_archive)


# --- bad input: one clear error, nothing left behind ----------------------------------------------------------


@pytest.fixture
def broken_copy(nsd_tree, tmp_path):
    copy = tmp_path / "nsd"
    _copy_as_a_user_has_it(nsd_tree, copy)
    for path in copy.rglob("betas_session*.hdf5"):
        path.unlink()
    return copy


def _truncate(path):
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def _assert_fails(root, tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match):
        prepare_subject(root, kwargs.pop("subject", 1), out, progress=False, **kwargs)
    assert not out.exists()


def test_missing_nsd_root(tmp_path):
    _assert_fails(tmp_path / "nowhere", tmp_path, "is not a folder")


@pytest.mark.parametrize(
    "relative, match",
    [
        ("nsddata/experiments/nsd/nsd_expdesign.mat", "missing NSD experiment design"),
        ("nsddata/experiments/nsd/nsd_stim_info_merged.csv", "missing NSD stimulus info"),
        ("nsddata/ppdata/subj01/func1pt8mm/roi/streams.nii.gz", "missing subj01 streams ROI"),
        ("nsddata_stimuli/stimuli/nsd/annotations/captions_val2017.json", "annotations holds no captions_val2017.json"),
    ],
)
def test_missing_file_is_named(broken_copy, tmp_path, relative, match):
    (broken_copy / relative).unlink()
    _assert_fails(broken_copy, tmp_path, match)


def test_subject_without_betas(broken_copy, tmp_path):
    _assert_fails(broken_copy, tmp_path, "no betas for subject 3", subject=3)


def test_sessions_beyond_what_exists(broken_copy, tmp_path):
    _assert_fails(broken_copy, tmp_path, "--sessions 4 asks for more sessions than subject 1 has \\(3", sessions=4)


def test_betas_grid_differs_from_roi_grid(broken_copy, tmp_path):
    path = nsd.betas_path(broken_copy, 1, 2)
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-1], image.affine), path)
    _assert_fails(broken_copy, tmp_path, "betas_session02.nii.gz has grid .* but the ROIs")


def test_truncated_nifti(broken_copy, tmp_path):
    _truncate(nsd.betas_path(broken_copy, 1, 2))
    _assert_fails(broken_copy, tmp_path, "betas_session02.nii.gz.*truncated or corrupt")


def test_corrupt_gzip_nifti(broken_copy, tmp_path):
    path = nsd.betas_path(broken_copy, 1, 3)
    raw = bytearray(gzip.decompress(path.read_bytes()))
    path.write_bytes(gzip.compress(bytes(raw[:400])))  # a valid gzip of a truncated image
    _assert_fails(broken_copy, tmp_path, "betas_session03.nii.gz.*truncated or corrupt")


def test_truncated_hdf5(nsd_tree, tmp_path):
    copy = tmp_path / "nsd"
    _copy_as_a_user_has_it(nsd_tree, copy)
    _truncate(nsd.betas_path(copy, 1, 1, ".hdf5"))
    _assert_fails(copy, tmp_path, "betas_session01.hdf5.*truncated or corrupt")


def test_captions_missing_for_a_coco_id(broken_copy, tmp_path, nsd_tree):
    info = pd.read_csv(nsd.stim_info_path(broken_copy), index_col=0)
    victim = int(info.cocoId[nsd_tree.trial_images[1][0]])  # an image subject 1 saw
    for split in coco.COCO_SPLITS:
        path = broken_copy / coco.NSD_ANNOTATIONS / coco.caption_name(split)
        document = json.loads(path.read_text())
        document["annotations"] = [a for a in document["annotations"] if a["image_id"] != victim]
        path.write_text(json.dumps(document))
    _assert_fails(broken_copy, tmp_path, f"no COCO captions for cocoId {victim}")


def test_dataset_card_lists_every_subject(nsd_tree, tmp_path):
    prepare_subject(nsd_tree.root, 1, tmp_path, sessions=2, progress=False, coco_annotations=nsd_tree.coco_archive)
    prepare_subject(nsd_tree.root, 2, tmp_path, progress=False, zscore=False, coco_annotations=nsd_tree.coco_archive)
    card = (tmp_path / "README.md").read_text()
    assert "config_name: subj01" in card and "config_name: subj02" in card
    assert "NSD Terms and Conditions" in card
    n_train = len(load_trials(tmp_path, 1, "train"))
    assert f"| subj01 | {n_train} |" in card


def test_a_hub_dataset_loads_offline_from_the_cache(prepared, tmp_path, monkeypatch):
    # a Hub dataset repo as the Hugging Face cache holds it (pushing over HTTP is tests/test_hub.py's business)
    cache = tmp_path / "cache"
    entry = cache / "datasets--someone--nsd-trials"
    commit = "0" * 40
    shutil.copytree(prepared, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    monkeypatch.setattr(data, "snapshot_download", _offline_snapshot_download(cache))
    test = load_trials("someone/nsd-trials", 2, "test")
    assert list(test["nsd_id"]) == list(load_trials(prepared, 2, "test")["nsd_id"])
    assert len(load_voxels("someone/nsd-trials", 2)) == len(load_voxels(prepared, 2))
    with pytest.raises(InputError, match="has no config subj05"):
        load_trials("someone/nsd-trials", 5, "test")


def _offline_snapshot_download(cache):
    import huggingface_hub

    def download(repo_id, **kwargs):
        return huggingface_hub.snapshot_download(repo_id, cache_dir=cache, local_files_only=True, **kwargs)

    return download


def test_unknown_source_explains_offline_mode():
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        load_trials("nobody/not-cached", 1, "test")


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_sessions=2, trials_per_session=25, n_shared=5, grid_shape=(10, 16, 12)),  # trials not a multiple of 3
        dict(n_sessions=4, trials_per_session=12, n_shared=3, grid_shape=(14, 12, 9), image_size=40),
    ],
)
def test_trial_to_image_mapping_on_other_tree_shapes(tmp_path, tiny, shape):
    tree = write_nsd_tree(tmp_path / "nsd", subjects=(3,), ldm=tiny, seed=7, **shape)
    prepare_subject(tree.root, 3, tmp_path / "out", progress=False, coco_annotations=tree.coco_archive)
    train, test = load_trials(tmp_path / "out", 3, "train"), load_trials(tmp_path / "out", 3, "test")
    images = tree.trial_images[3]
    for split in (train, test):
        for nsd_id, trials in zip(split["nsd_id"], split["trials"]):
            assert all(images[t - 1] == nsd_id for t in trials)
    assert len(train) + sum(test["n_reps"]) == shape["n_sessions"] * shape["trials_per_session"]
    assert np.asarray(test[0]["image"]).shape == (shape.get("image_size", 128),) * 2 + (3,)  # write_nsd_tree default
    assert load_voxels(tmp_path / "out", 3).grid_shape == shape["grid_shape"]


# --- trials sit where NSD's design puts them -------------------------------------------------------------------


def _cut_session(root, subject, session, keep, formats=(".nii.gz", ".hdf5")):
    """Rewrite one session's betas with only its first ``keep`` volumes, as a failed copy leaves them."""
    from brainldm.offline.synthetic import write_betas_hdf5

    image = nib.load(nsd.betas_path(root, subject, session))
    volume = np.asarray(image.dataobj)[..., :keep]
    if ".hdf5" in formats and nsd.betas_path(root, subject, session, ".hdf5").exists():
        write_betas_hdf5(nsd.betas_path(root, subject, session, ".hdf5"), volume)
    if ".nii.gz" in formats:
        nib.save(nib.Nifti1Image(volume, image.affine), nsd.betas_path(root, subject, session))


@pytest.mark.parametrize("session", [1, 3])  # the first (every later trial would shift) and the last (dropped)
@pytest.mark.parametrize("betas", ["hdf5", "nifti"])
def test_a_session_with_fewer_trials_than_the_design_is_an_error_naming_it(nsd_tree, tmp_path, session, betas):
    copy = tmp_path / "nsd"
    _copy_as_a_user_has_it(nsd_tree, copy)
    if betas == "nifti":
        for path in copy.rglob("betas_session*.hdf5"):
            path.unlink()
    _cut_session(copy, 1, session, 25)
    if betas == "hdf5":  # the twins only, as the bucket reader prefers them
        for path in copy.rglob("betas_session*.nii.gz"):
            path.unlink()
    suffix = ".hdf5" if betas == "hdf5" else ".nii.gz"
    _assert_fails(copy, tmp_path, rf"betas_session{session:02d}\{suffix} holds 25 trials, but NSD's design has 30")


def test_sessions_out_of_order_or_missing_keep_the_designs_trial_numbers(nsd_tree, prepared, tmp_path):
    """Sessions 3 and 1 (2 withheld, as NSD withholds some): each trial keeps its number, image and betas."""
    subset = prepare_subject(
        nsd_tree.root, 2, tmp_path / "subset", sessions=[3, 1], progress=False, coco_annotations=nsd_tree.coco_archive
    )
    full = load_trials(prepared, 2, "train").with_format("numpy")
    by_trial = {int(t[0]): i for i, t in enumerate(full["trials"])}
    part = load_trials(subset.parent, 2, "train").with_format("numpy")
    per = nsd_tree.trials_per_session
    numbers = [int(t[0]) for t in part["trials"]]
    assert {(n - 1) // per + 1 for n in numbers} == {1, 3}
    assert [int(s[0]) for s in part["sessions"]] == [(n - 1) // per + 1 for n in numbers]
    rows = [by_trial[n] for n in numbers]
    np.testing.assert_array_equal(part["nsd_id"], full["nsd_id"][rows])
    np.testing.assert_array_equal(part["nsd_id"], nsd_tree.trial_images[2][np.array(numbers) - 1])
    # z-scoring is within each session, so a session's betas do not depend on which others were read
    np.testing.assert_allclose(np.stack(part["betas"]), np.stack(full["betas"][rows]), atol=1e-6)


def test_stim_info_that_misplaces_a_trial_is_caught_by_the_cross_check(nsd_tree, tmp_path):
    """Two trials' numbers swapped between their images in nsd_stim_info_merged.csv: the design and the file disagree
    on both, whichever direction is compared first."""
    copy = tmp_path / "nsd"
    _copy_as_a_user_has_it(nsd_tree, copy)
    info = pd.read_csv(nsd.stim_info_path(copy), index_col=0)
    images = nsd_tree.trial_images[1]
    a, b = 5, 1 + int(np.flatnonzero(images != images[4])[-1])  # 1-based trial numbers of two different images
    columns = ["subject1_rep0", "subject1_rep1", "subject1_rep2"]
    table = info[columns].to_numpy()
    at_a, at_b = table == a, table == b
    assert at_a.sum() == at_b.sum() == 1
    table[at_a], table[at_b] = b, a
    info[columns] = table
    info.to_csv(nsd.stim_info_path(copy))
    _assert_fails(copy, tmp_path, "nsd_expdesign.mat and nsd_stim_info_merged.csv disagree: trial")
