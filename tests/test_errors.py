"""Every kind of bad input ends in one `error:` line and exit status 2, with nothing half-written."""

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainldm.cli import EXIT_USER_ERROR
from brainldm.data import coco, nsd
from brainldm.validation import InputError

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run(script: str, args: list[str], capsys) -> tuple[int, str]:
    """Run ``scripts/<script>.py`` in this process -> (exit status, stderr)."""
    spec = importlib.util.spec_from_file_location(script, SCRIPTS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    try:
        module.main([str(a) for a in args])
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, *fragments: str) -> None:
    """stderr ends in one ``error:`` line (argparse prints its usage above its own) and holds no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and "error:" in lines[-1] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture
def tree(nsd_tree, tmp_path):
    """A private copy of the session's NSD tree, NIfTI betas only (no HDF5 twins), to damage."""
    root = tmp_path / "nsd"
    shutil.copytree(nsd_tree.root, root, ignore=shutil.ignore_patterns("betas_session*.hdf5"))
    with zipfile.ZipFile(nsd_tree.coco_archive) as archive:  # COCO's captions where nsd_access unpacks them
        archive.extractall(root / coco.NSD_ANNOTATIONS.rsplit("/", 1)[0])
    return root


# --- arguments, checked where they enter --------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, args, fragment",
    [
        ("reconstruct", ["--batch-size", "0"], "--batch-size: 0 is outside [1, inf]"),
        ("reconstruct", ["--trials", "1.5"], "--trials: expected rows as START:STOP"),
        ("reconstruct", ["--seed", str(2**64)], "--seed: 18446744073709551616 is outside [0, 18446744073709551615]"),
        ("reconstruct", ["--guidance", "0.5"], "--guidance: 0.5 is outside [1, inf]"),
        ("reconstruct", ["--strength", "0"], "--strength: 0 is outside (0, 1]"),
        ("reconstruct", ["--samples", "two"], "--samples: expected a whole number, got 'two'"),
        ("extract_features", ["--subject", "0"], "--subject: 0 is outside [1, inf]"),
        ("fit_maps", ["--ranks", "c=-5"], "--ranks: -5 is outside [1, inf]"),
        ("fit_maps", ["--ranks", "c=0"], "--ranks: 0 is outside [1, inf]"),
        ("fit_maps", ["--ranks", "1024"], "--ranks: expected name=value pairs such as c=1024, got '1024'"),
        ("fit_maps", ["--alphas", "1,0,10"], "--alphas: 0 is outside (0, inf]"),
        ("fit_maps", ["--cv", "1"], "--cv: 1 is outside [2, inf]"),
        ("encoding", ["--components", "0"], "--components: 0 is outside [1, inf]"),
        ("evaluate", ["--kinds", "Xz,Xq"], "--kinds: unknown name(s) ['Xq']"),
        ("evaluate", ["--metrics", "pixcorr,vibes"], "--metrics: unknown name(s) ['vibes']"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(script, args, fragment, capsys, tmp_path):
    required = {
        "reconstruct": ["--maps", tmp_path, "--data", tmp_path, "--subject", "1", "--out", tmp_path / "o"],
        "extract_features": ["--data", tmp_path, "--subject", "1", "--out", tmp_path / "o"],
        "fit_maps": ["--data", tmp_path, "--features", tmp_path, "--subject", "1", "--out", tmp_path / "o"],
        "encoding": ["--data", tmp_path, "--features", tmp_path, "--subject", "1", "--out", tmp_path / "o"],
        "evaluate": ["--recon", tmp_path, "--out", tmp_path / "o"],
    }[script]
    code, err = run(script, [*required, *args], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_error_line(err, fragment)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", ["extract_features", "fit_maps", "encoding", "reconstruct"])
def test_a_subject_beyond_nsds_eight_is_a_subject_like_any_other(script, capsys, tmp_path):
    # a user's own experiment may number its subjects 9 or 40: only NSD's own scripts stop at 8
    required = {
        "reconstruct": ["--maps", tmp_path, "--data", tmp_path],
        "extract_features": ["--data", tmp_path],
        "fit_maps": ["--data", tmp_path, "--features", tmp_path],
        "encoding": ["--data", tmp_path, "--features", tmp_path],
    }[script]
    code, err = run(script, [*required, "--subject", "40", "--out", tmp_path / "o"], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_error_line(err)
    assert "--subject:" not in err  # past the arguments: what is missing is the data (here, everything)


def test_an_output_path_that_is_a_file_is_refused_before_the_work(tree, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "below"):
        code, err = run("prepare_nsd", ["--nsd-root", tree, "--subject", "1", "--out", out], capsys)
        assert code == EXIT_USER_ERROR
        assert_one_error_line(err, "--out:", str(a_file))
    assert a_file.read_text() == "not a folder"


def test_a_user_caused_failure_exits_with_status_2(tmp_path, capsys):
    code, err = run("prepare_nsd", ["--nsd-root", tmp_path / "nowhere", "--subject", "1", "--out", tmp_path / "o"],
                    capsys)  # fmt: skip
    assert code == EXIT_USER_ERROR
    assert_one_error_line(err, "nowhere")
    assert not (tmp_path / "o").exists()


# --- damaged or surprising data ---------------------------------------------------------------------------------


def test_a_stim_info_csv_without_a_needed_column_names_it(tree, tmp_path, capsys):
    path = nsd.stim_info_path(tree)
    pd.read_csv(path, index_col=0).drop(columns=["cocoId"]).to_csv(path)
    code, err = run("prepare_nsd", ["--nsd-root", tree, "--subject", "1", "--out", tmp_path / "o"], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_error_line(err, "no cocoId column", str(path))
    assert not (tmp_path / "o").exists()


def test_a_gap_in_the_sessions_is_an_error_unless_sessions_stops_before_it(tree, tmp_path, capsys):
    nsd.betas_path(tree, 1, 2).unlink()
    code, err = run("prepare_nsd", ["--nsd-root", tree, "--subject", "1", "--out", tmp_path / "o"], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_error_line(err, "betas of session 2 are missing", "--sessions 1")
    assert not (tmp_path / "o").exists()
    code, err = run("prepare_nsd", ["--nsd-root", tree, "--subject", "1", "--out", tmp_path / "o", "--sessions", "1"],
                  capsys)  # fmt: skip
    assert code == 0, err
    info = json.loads((tmp_path / "o" / "subj01" / "info.json").read_text())
    assert info["sessions"] == [1]  # the dataset records which sessions it holds


def test_nan_betas_name_the_session_voxel_and_trial(tree, tmp_path, capsys):
    path = nsd.betas_path(tree, 1, 3)
    image = nib.load(path)
    data = np.asarray(image.dataobj).astype(np.float32)
    general = np.asarray(nsd.read_roi(tree, 1, "nsdgeneral").dataobj)
    i, j, k = np.argwhere(general == 1)[0]
    data[i, j, k, 4] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)
    code, err = run("prepare_nsd", ["--nsd-root", tree, "--subject", "1", "--out", tmp_path / "o"], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_error_line(err, "1 NaN or infinite betas", f"voxel ({i}, {j}, {k})", "trial 5 of session 3")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*partial"))


def test_features_of_different_models_are_refused_at_fit_time(decoding_world, tmp_path, capsys):
    features = tmp_path / "features"
    shutil.copytree(decoding_world.features, features)
    config = json.loads((features / "c" / "config.json").read_text())
    (features / "c" / "config.json").write_text(json.dumps({**config, "model_id": "CompVis/stable-diffusion-v1-4"}))
    args = ["--data", decoding_world.data, "--features", features, "--subject", "1", "--out", tmp_path / "maps"]
    code, err = run("fit_maps", args, capsys)
    assert code == EXIT_USER_ERROR
    assert_one_error_line(err, "z features", "'tiny'", "c features from 'CompVis/stable-diffusion-v1-4'")
    assert not (tmp_path / "maps").exists()


def test_a_rank_above_the_maps_dimensions_is_refused(decoding_world, tmp_path):
    from brainldm.decoding.fit import fit_subject_maps

    with pytest.raises(InputError, match=r"--ranks z=100000 is above what the z map can hold"):
        fit_subject_maps(decoding_world.data, decoding_world.features, 1, ranks={"z": 100_000}, device="cpu")


def test_a_rerun_with_other_settings_is_refused_unless_overwrite(decoding_world, tiny, tmp_path):
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.presets import Sampling
    from brainldm.reconstruction.job import reconstruct_trials

    recon = Reconstructor(tiny, output_size=64)
    common = dict(rows=[0], progress=False)
    reconstruct_trials(
        recon, decoding_world.maps, decoding_world.data, 1, tmp_path, sampling=Sampling(num_inference_steps=4), **common
    )
    made = (tmp_path / "subj01" / "test-00000" / "Xzc_0.png").read_bytes()
    with pytest.raises(InputError, match=r"test-00000 was made with num_inference_steps 4 \(now 5\).*--overwrite"):
        reconstruct_trials(recon, decoding_world.maps, decoding_world.data, 1, tmp_path,
                           sampling=Sampling(num_inference_steps=5), **common)  # fmt: skip
    assert (tmp_path / "subj01" / "test-00000" / "Xzc_0.png").read_bytes() == made  # untouched
    reconstruct_trials(recon, decoding_world.maps, decoding_world.data, 1, tmp_path,
                       sampling=Sampling(num_inference_steps=5), overwrite=True, **common)  # fmt: skip
    meta = json.loads((tmp_path / "subj01" / "test-00000" / "meta.json").read_text())
    assert meta["num_inference_steps"] == 5


def test_steps_beyond_the_schedulers_are_named_and_nothing_is_written(decoding_world, tiny, tmp_path):
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.presets import Sampling
    from brainldm.reconstruction.job import reconstruct_trials

    with pytest.raises(InputError, match="steps must be in 1..1000 .*got 5000"):
        reconstruct_trials(Reconstructor(tiny), decoding_world.maps, decoding_world.data, 1, tmp_path / "out",
                           sampling=Sampling(num_inference_steps=5000), progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_config_json_that_is_not_json_is_named(decoding_world, tmp_path):
    from brainldm.decoding.maps import SubjectMaps

    decoding_world.maps.save_pretrained(tmp_path / "maps")
    (tmp_path / "maps" / "config.json").write_text('{"subject": 1,')  # truncated
    with pytest.raises(InputError, match="config.json of .*maps is not valid JSON"):
        SubjectMaps.from_pretrained(tmp_path / "maps")


def test_a_truncated_png_in_a_reconstruction_folder_is_named(decoding_world, tiny, tmp_path, capsys):
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.presets import Sampling
    from brainldm.reconstruction.job import reconstruct_trials

    recon = Reconstructor(tiny, output_size=64)
    reconstruct_trials(recon, decoding_world.maps, decoding_world.data, 1, tmp_path / "recon", rows=[0, 1],
                       sampling=Sampling(num_inference_steps=2), progress=False)  # fmt: skip
    png = tmp_path / "recon" / "subj01" / "test-00001" / "Xz.png"
    png.write_bytes(png.read_bytes()[:100])
    code, err = run("evaluate", ["--recon", tmp_path / "recon", "--out", tmp_path / "metrics", "--metrics", "pixcorr"],
                    capsys)  # fmt: skip
    assert code == EXIT_USER_ERROR
    assert_one_error_line(err, f"cannot read {png}", "rerun reconstruct.py")
    assert not (tmp_path / "metrics").exists()


def test_steps_beyond_the_scheduler_and_weak_guidance_are_refused_for_features(tiny, tmp_path):
    from brainldm.data.features import parse_features
    from brainldm.ldm.extraction import extract_features

    image = (np.zeros((64, 64, 3), dtype=np.uint8), ["a red circle"])
    for kwargs, match in ((dict(num_inference_steps=5000), r"steps must be in 1\.\.1000"),
                          (dict(guidance_scale=0.5), "guidance must be >= 1"),
                          (dict(batch_size=0), "batch size must be >= 1")):  # fmt: skip
        with pytest.raises(InputError, match=match):
            extract_features(tiny, "tiny", [0], lambda i: image, parse_features("zc@0.5"), tmp_path / "f", **kwargs)
    assert not (tmp_path / "f").exists()


def test_an_impossible_synthetic_world_is_one_error_line(tmp_path, capsys):
    code, err = run("make_synthetic_nsd", ["--out", tmp_path / "nsd", "--shared", "200"], capsys)
    assert code == EXIT_USER_ERROR
    assert_one_error_line(err, "more images per subject (30) than shared images (200)")
    assert not (tmp_path / "nsd").exists()
