"""The dataset seam: a user's own experiment (NIfTI betas, image files, captions, ROI masks) runs the whole
pipeline, prepare -> features -> fit -> reconstruct, with no NSD file in sight, and agrees with the NSD reader."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from brainldm.data import nsd
from brainldm.data.readers import ExperimentReader
from brainldm.data.trials import load_trials, load_voxels, prepare
from brainldm.validation import InputError


def write_experiment(tree, subject: int, folder):
    """Rewrite one synthetic NSD subject as a user's own experiment: other file names, other formats, other scale."""
    images = tree.trial_images[subject]
    shown = np.unique(images)
    (folder / "images").mkdir(parents=True)
    (folder / "betas").mkdir()
    (folder / "rois").mkdir()
    with nsd.Stimuli(tree.root) as stimuli:
        for i in shown:
            Image.fromarray(stimuli[i]).save(folder / "images" / f"stim_{i:04d}.png")
    name = {int(i): f"stim_{i:04d}.png" for i in shown}
    (folder / "captions.json").write_text(json.dumps({name[i]: tree.captions[i] for i in name}))
    (folder / "trials.txt").write_text("\n".join(name[int(i)] for i in images))
    (folder / "test.txt").write_text("\n".join(name[int(i)] for i in shown if i in set(tree.shared.tolist())))
    runs = []
    for session in range(1, tree.n_sessions + 1):
        betas = nib.load(nsd.betas_path(tree.root, subject, session))
        run = folder / "betas" / f"run{session}.nii.gz"  # float32 in arbitrary units, not NSD's int16 x 300
        nib.save(nib.Nifti1Image(np.asarray(betas.dataobj, dtype=np.float32) * 0.7 + 3.0, betas.affine), run)
        runs.append(f"betas/run{session}.nii.gz")
    streams = nib.load(nsd.roi_path(tree.root, subject, "streams"))
    for roi in ("early", "ventral"):
        mask = (np.asarray(streams.dataobj) == nsd.STREAM_IDS[roi]).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, streams.affine), folder / "rois" / f"{roi}.nii.gz")
    manifest = {
        "subject": subject,
        "betas": runs,
        "trials": "trials.txt",
        "images": "images",
        "captions": "captions.json",
        "rois": {"early": "rois/early.nii.gz", "ventral": "rois/ventral.nii.gz"},
        "test": "test.txt",
    }
    (folder / "experiment.json").write_text(json.dumps(manifest))
    return folder / "experiment.json", name


@pytest.fixture(scope="module")
def experiment(decoding_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("experiment")
    manifest, names = write_experiment(decoding_world.tree, 1, folder / "raw")
    prepare(ExperimentReader(manifest), folder / "trials", progress=False)
    return folder, manifest, names


def test_an_experiment_gives_the_same_trials_as_the_nsd_reader_on_the_same_data(experiment, decoding_world):
    folder, _, names = experiment
    mine, theirs = load_voxels(folder / "trials", 1), load_voxels(decoding_world.data, 1)
    assert sorted(mine.roi_names.values()) == ["early", "unknown", "ventral"]
    for roi in ("early", "ventral"):  # the same voxels, in the same order
        np.testing.assert_array_equal(mine.ijk[mine.roi(roi)], theirs.ijk[theirs.roi(roi)])
    for split in ("train", "test"):
        a = load_trials(folder / "trials", 1, split).with_format("numpy")
        b = load_trials(decoding_world.data, 1, split).with_format("numpy")
        assert [list(t) for t in a["trials"]] == [list(t) for t in b["trials"]]
        assert [names[int(i)] for i in b["nsd_id"]] == [
            sorted(names.values())[int(i)] for i in a["nsd_id"]
        ]  # stimulus ids: positions of the image files
        early_a = np.asarray(a["betas"])[:, mine.roi("early")]
        early_b = np.asarray(b["betas"])[:, theirs.roi("early")]
        np.testing.assert_allclose(early_a, early_b, atol=1e-4)  # z-scored per session: the units do not matter
        assert list(a["captions"][0]) == list(b["captions"][0])


def test_an_experiment_runs_features_fit_and_reconstruct_without_nsd_files(experiment, tiny, tmp_path):
    from brainldm.data.features import parse_features
    from brainldm.data.trials import SubjectStimuli
    from brainldm.decoding.fit import fit_subject_maps
    from brainldm.ldm.extraction import extract_features
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.presets import Sampling
    from brainldm.reconstruction.job import reconstruct_trials

    folder, _, _ = experiment
    stimuli = SubjectStimuli(folder / "trials", 1)
    extract_features(
        tiny, "tiny", stimuli.nsd_ids, stimuli.__getitem__, parse_features("z,c"), tmp_path / "features", progress=False
    )
    maps = fit_subject_maps(folder / "trials", tmp_path / "features", 1, device="cpu")
    assert maps.config.scores["z"]["identification"] >= 0.9 and maps.config.scores["c"]["identification"] >= 0.9
    done = reconstruct_trials(
        Reconstructor(tiny, output_size=64), maps, folder / "trials", 1, tmp_path / "recon", rows=[0],
        sampling=Sampling(num_inference_steps=2), progress=False,
    )  # fmt: skip
    assert {p.name for p in done[0].iterdir()} >= {"original.png", "Xz.png", "Xc_0.png", "Xzc_0.png"}


def test_other_roi_names_are_decoded_when_asked_for(experiment, tiny, tmp_path):
    folder, manifest, _ = experiment
    spec = json.loads(manifest.read_text())
    spec["rois"] = {"V1-V3": spec["rois"]["early"], "FFA+PPA": spec["rois"]["ventral"]}
    renamed = manifest.with_name("renamed.json")
    renamed.write_text(json.dumps(spec))
    prepare(ExperimentReader(renamed), tmp_path / "trials", progress=False)
    voxels = load_voxels(tmp_path / "trials", 1)
    assert len(voxels.roi("V1-V3")) == len(load_voxels(folder / "trials", 1).roi("early"))
    with pytest.raises(InputError, match="unknown ROI 'early'.*'FFA\\+PPA', 'V1-V3'"):
        voxels.roi("early")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda raw, spec: spec.pop("captions"), "has no captions; it needs"),
        (lambda raw, spec: (raw / "trials.txt").write_text("nope.png\n"), "names 'nope.png', which is not in"),
        (
            lambda raw, spec: (raw / "trials.txt").write_text(
                (raw / "trials.txt").read_text() + "\n" + (raw / "trials.txt").read_text().split()[0]
            ),
            "the betas hold .* trials .* but the trials list names",
        ),
        (lambda raw, spec: (raw / "captions.json").write_text("{}"), "has no captions for 'stim_"),
        (lambda raw, spec: spec["rois"].update(early="rois/missing.nii.gz"), "missing ROI mask 'early'"),
    ],
)
def test_a_broken_experiment_is_one_clear_error_and_leaves_nothing(experiment, tmp_path, capsys, damage, match):
    import re
    import shutil

    from test_errors import assert_one_error_line, run

    from brainldm.cli import EXIT_USER_ERROR

    _, manifest, _ = experiment
    raw = tmp_path / "raw"
    shutil.copytree(manifest.parent, raw)
    spec = json.loads((raw / "experiment.json").read_text())
    damage(raw, spec)
    (raw / "experiment.json").write_text(json.dumps(spec))
    code, err = run("prepare_experiment", ["--manifest", raw / "experiment.json", "--out", tmp_path / "out"], capsys)
    assert code == EXIT_USER_ERROR and re.search(match, err), err
    assert_one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_the_script_prepares_an_experiment(experiment, tmp_path, capsys):
    from test_errors import run

    _, manifest, _ = experiment
    code, _ = run("prepare_experiment", ["--manifest", manifest, "--out", tmp_path / "out"], capsys)
    assert code == 0 and len(load_trials(tmp_path / "out", 1, "test")) == 20


@pytest.mark.parametrize(
    "change, match",
    [
        ({"betas": None}, "'betas' must be a path or a non-empty list of paths, got None"),
        ({"betas": []}, "'betas' must be a path or a non-empty list"),
        ({"betas": ["betas/run1.nii.gz", 3]}, "'betas' must be a path"),
        ({"trials": 7}, "'trials' must be a path \\(a string\\), got 7"),
        ({"images": ["images"]}, "'images' must be a path"),
        ({"rois": "rois/early.nii.gz"}, "'rois' must map ROI names to mask paths"),
        ({"rois": {"early": 1}}, "'rois' must map ROI names to mask paths"),
        ({"subject": "one"}, "'subject' must be a whole number >= 1, got 'one'"),
        ({"subject": 0}, "'subject' must be a whole number >= 1"),
        ({"test": "nowhere.txt"}, "missing test list: .*nowhere.txt does not exist"),
        ({"captions": "trials.txt"}, "trials.txt is not valid JSON"),
        ({"images": "trials.txt"}, "the images folder .*trials.txt does not exist"),
        ({"rois": {"early": "rois/missing.nii.gz"}}, "missing ROI mask 'early'"),
    ]
    + [({key: "__delete__"}, f"has no {key}") for key in ("betas", "trials", "images", "captions", "rois", "test")],
)
def test_a_bad_manifest_field_is_named(experiment, tmp_path, change, match):
    _, manifest, _ = experiment
    spec = json.loads(manifest.read_text())
    for key, value in change.items():
        if value == "__delete__":
            del spec[key]
        else:
            spec[key] = value
    broken = manifest.with_name(f"broken-{tmp_path.name}.json")
    broken.write_text(json.dumps(spec))
    with pytest.raises(InputError, match=match):
        prepare(ExperimentReader(broken), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_captions_that_are_not_a_mapping_are_named(experiment, tmp_path):
    _, manifest, _ = experiment
    spec = json.loads(manifest.read_text())
    (manifest.parent / "list.json").write_text(json.dumps(["a caption"]))
    spec["captions"] = "list.json"
    broken = manifest.with_name("list-captions.json")
    broken.write_text(json.dumps(spec))
    with pytest.raises(InputError, match="must map image files to lists of captions"):
        ExperimentReader(broken)
