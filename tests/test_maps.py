"""SubjectMaps: recovery of planted features, exact round trips, the Hub doors, compact forms, clear errors."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from brainldm.data.features import load_features
from brainldm.data.trials import load_trials, load_voxels
from brainldm.decoding.fit import fit_linear_map, fit_subject_maps
from brainldm.decoding.maps import MapsConfig, SubjectMaps
from brainldm.decoding.ridge import reduced_rank
from brainldm.metrics import two_way_identification
from brainldm.validation import InputError


def _test_betas(world, subject=1):
    test = load_trials(world.data, subject, "test").with_format("numpy")
    return np.asarray(test["betas"]), np.asarray(test["nsd_id"])


def test_planted_z_and_c_are_recovered_at_high_snr(decoding_world):
    scores = decoding_world.maps.config.scores
    assert scores["z"]["identification"] >= 0.95
    assert scores["c"]["identification"] >= 0.95
    # and the reported score is what predict gives
    betas, ids = _test_betas(decoding_world)
    decoded = decoding_world.maps.predict(betas)
    assert decoded["z"].shape == (len(ids), 4, 40, 40) and decoded["c"].shape == (len(ids), 77, 32)
    true_z = load_features(decoding_world.features, "z", ids)
    identified = two_way_identification(decoded["z"].numpy(), true_z)
    assert np.mean(identified) == pytest.approx(scores["z"]["identification"])


def test_maps_are_keyed_by_the_decoded_targets_and_their_rois(decoding_world):
    maps = decoding_world.maps
    assert set(maps.maps) == set(maps.config.targets) == {"z", "c"}
    assert {name: t.roi for name, t in maps.config.targets.items()} == {"z": "early", "c": "ventral"}
    voxels = load_voxels(decoding_world.data, 1)
    assert np.array_equal(maps["z"].voxels.numpy(), voxels.roi("early"))
    assert maps.config.targets["c"].shape == (77, 32) and maps.config.targets["c"].n_voxels == len(
        voxels.roi("ventral")
    )


def test_save_and_load_round_trip_exactly(decoding_world, tmp_path):
    maps = decoding_world.maps
    maps.save_pretrained(tmp_path / "m")
    loaded = SubjectMaps.from_pretrained(tmp_path / "m")
    assert loaded.config == maps.config
    for name in ("z", "c"):
        for field in ("weight", "intercept", "mean", "std", "voxels", "ijk", "best_alphas"):
            assert torch.equal(getattr(loaded[name], field), getattr(maps[name], field))
    assert loaded.per_image.keys() == maps.per_image.keys()
    for key, values in maps.per_image.items():
        np.testing.assert_array_equal(loaded.per_image[key], values)
    betas, _ = _test_betas(decoding_world)
    a, b = loaded.predict(betas), maps.predict(betas)
    assert all(torch.equal(a[name], b[name]) for name in ("z", "c"))
    assert MapsConfig.from_dict(json.loads((tmp_path / "m" / "config.json").read_text())) == maps.config


def test_config_json_is_the_source_of_truth_on_load(decoding_world, tmp_path):
    folder = decoding_world.maps.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["n_test"] = 12345
    (folder / "config.json").write_text(json.dumps(config))
    assert SubjectMaps.from_pretrained(folder).config.n_test == 12345
    config["format"] = "brainldm-subject-maps/1"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="refit the maps"):
        SubjectMaps.from_pretrained(folder)


def test_from_pretrained_works_offline_from_the_hub_cache(decoding_world, tmp_path):
    decoding_world.maps.save_pretrained(tmp_path / "m")
    cache = tmp_path / "cache"
    repo = cache / "models--someone--brainldm-subj01"
    commit = "1" * 40
    shutil.copytree(tmp_path / "m", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = SubjectMaps.from_pretrained("someone/brainldm-subj01", cache_dir=cache)  # HF_HUB_OFFLINE=1 in tests
    assert loaded.config == decoding_world.maps.config
    with pytest.raises(InputError, match="HF_HUB_OFFLINE=1 the maps must already be in the Hugging Face cache"):
        SubjectMaps.from_pretrained("someone/not-cached", cache_dir=cache)


def test_model_card_carries_licences_links_and_results(decoding_world, tmp_path):
    maps = decoding_world.maps
    config = replace(maps.config, model_id="CompVis/stable-diffusion-v1-4", data="someone/nsd-trials")
    SubjectMaps(maps.maps, config).save_pretrained(tmp_path / "m")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "brainldm" and card.data.pipeline_tag is None
    assert (card.data.license, card.data.license_name) == ("other", "nsd-terms-and-conditions")
    assert card.data.license_link.startswith("https://") and "creativeml-openrail-m" in card.text
    assert card.data.base_model == "CompVis/stable-diffusion-v1-4"
    assert card.data.datasets == ["someone/nsd-trials"]
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["z: 2-way identification"] == pytest.approx(maps.config.scores["z"]["identification"], abs=1e-4)
    assert results["c: mean r per image"] == pytest.approx(maps.config.scores["c"]["pattern_r"], abs=1e-4)
    assert "SubjectMaps.from_pretrained" in card.text and "REPO_ID" not in card.text


def test_compact_maps_keep_decoding_and_shrink(decoding_world, tmp_path):
    full = decoding_world.maps
    compact = fit_subject_maps(
        decoding_world.data, decoding_world.features, 1, ranks={"z": 24, "c": 24}, storage_dtype="float16", device="cpu"
    )
    assert compact["c"].rank == 24 and compact.nbytes < full.nbytes / 4
    for name in ("z", "c"):
        assert compact.config.scores[name]["pattern_r"] >= 0.99 * full.config.scores[name]["pattern_r"]
    compact.save_pretrained(tmp_path / "c")
    loaded = SubjectMaps.from_pretrained(tmp_path / "c")
    betas, _ = _test_betas(decoding_world)
    torch.testing.assert_close(loaded.predict(betas)["c"], compact.predict(betas)["c"], atol=2e-2, rtol=2e-2)
    assert (tmp_path / "c" / "maps.safetensors").stat().st_size < 0.3 * full.nbytes


def test_a_map_standardises_its_voxels_on_the_training_trials():
    """As the reference code's StandardScaler: per-voxel gains and offsets of the betas leave the predictions as
    they were (a ridge fit on unstandardised betas would penalise each voxel by its scale)."""
    rng = np.random.default_rng(0)
    betas = rng.standard_normal((120, 30)).astype(np.float32)
    targets = betas[:, :10] @ rng.standard_normal((10, 5)) + 0.5 * rng.standard_normal((120, 5))
    gains, offsets = rng.uniform(0.2, 5.0, 30), rng.uniform(-3.0, 3.0, 30)
    test = rng.standard_normal((10, 30))

    def fit_and_predict(transform):
        fitted, _ = fit_linear_map(transform(betas), targets, np.arange(30), np.zeros((30, 3)), np.arange(120) // 24,
                                   device="cpu")  # fmt: skip
        return fitted.predict(torch.from_numpy(transform(test).astype(np.float32)))

    plain = fit_and_predict(lambda b: b)
    torch.testing.assert_close(fit_and_predict(lambda b: b * gains + offsets), plain, atol=1e-3, rtol=1e-3)


def test_reduced_rank_is_exact_at_full_rank_and_beats_plain_svd():
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.standard_normal((200, 15)) * np.linspace(0.1, 5, 15))
    W = torch.from_numpy(rng.standard_normal((15, 40)))
    left, right = reduced_rank(W, X.T @ X, 15)
    torch.testing.assert_close(left @ right, W)
    left, right = reduced_rank(W, X.T @ X, 4)
    u, s, vt = torch.linalg.svd(W, full_matrices=False)
    svd = (u[:, :4] * s[:4]) @ vt[:4]
    assert torch.linalg.norm(X @ (W - left @ right)) < torch.linalg.norm(X @ (W - svd))


# --- bad input -----------------------------------------------------------------------------------------------


def test_betas_of_another_subject_are_refused(decoding_world):
    betas, _ = _test_betas(decoding_world, subject=2)
    with pytest.raises(InputError, match="fitted on subject 1's voxel table"):
        decoding_world.maps.predict(betas, voxels=load_voxels(decoding_world.data, 2))
    with pytest.raises(InputError, match="are these betas from another subject"):
        decoding_world.maps.predict(betas[:, :-1])


def test_features_missing_for_some_images(decoding_world, tmp_path):
    partial = tmp_path / "features"
    shutil.copytree(decoding_world.features, partial)
    shards = sorted((partial / "c").glob("shard-*.safetensors"))
    shards[0].unlink()  # the first shards hold subject 1 images
    with pytest.raises(InputError, match="c features are missing for"):
        fit_subject_maps(decoding_world.data, partial, 1, device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "foreign"])
def test_corrupt_or_foreign_safetensors_are_named(decoding_world, tmp_path, damage):
    decoding_world.maps.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "maps.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        match = "truncated or not a safetensors file"
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path))
        match = "not brainldm subject maps"
    with pytest.raises(InputError, match=match):
        SubjectMaps.from_pretrained(tmp_path / "m")


def test_nan_betas_and_bad_alphas_are_refused(decoding_world):
    betas, _ = _test_betas(decoding_world)
    betas = betas.copy()
    betas[0, 5] = np.nan
    with pytest.raises(InputError, match="betas contains 1 NaN"):
        decoding_world.maps.predict(betas)
    with pytest.raises(InputError, match="alphas must all be > 0"):
        fit_subject_maps(decoding_world.data, decoding_world.features, 1, alphas=[1.0, 0.0], device="cpu")


def test_fit_maps_script_writes_loadable_maps(decoding_world, tmp_path):
    args = ["--data", str(decoding_world.data), "--features", str(decoding_world.features), "--subject", "2"]
    run = subprocess.run(
        [sys.executable, "scripts/fit_maps.py", *args, "--out", str(tmp_path / "w"), "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "2-way identification" in run.stdout
    assert SubjectMaps.from_pretrained(tmp_path / "w").subject == 2
    bad = subprocess.run(
        [sys.executable, "scripts/fit_maps.py", *args, "--out", str(tmp_path / "x"), "--alphas", "1,-2"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--alphas: -2 is outside (0, inf]" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_saved_maps_hold_no_local_path(decoding_world, tmp_path):
    from safetensors import safe_open

    folder = decoding_world.maps.save_pretrained(tmp_path / "maps")
    local = str(decoding_world.root)
    for path in folder.iterdir():
        if path.suffix in (".json", ".md"):
            assert local not in path.read_text(), path.name
    with safe_open(str(folder / "maps.safetensors"), "pt") as f:
        assert local not in json.dumps(f.metadata())
    assert decoding_world.maps.config.data is None


def test_a_third_target_flows_through_fit_card_evaluation_and_the_app(decoding_world, tiny, tmp_path):
    """Targets are data: a decoder added to the preset (a new target from a new ROI) needs no code change."""
    import app as app_module
    from brainldm.analysis.evaluate import evaluate
    from brainldm.demo import Subject
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.presets import Sampling
    from brainldm.reconstruction.job import reconstruct_trials

    features = tmp_path / "features"
    shutil.copytree(decoding_world.features, features)
    shutil.copytree(features / "c", features / "c2")  # a third target: c again, decoded from the lateral stream
    decoders = (("z", "early"), ("c", "ventral"), ("c2", "lateral"))
    fit_subject_maps(decoding_world.data, features, 1, decoders=decoders, device="cpu").save_pretrained(tmp_path / "m")
    maps = SubjectMaps.from_pretrained(tmp_path / "m")
    assert list(maps.config.targets) == ["z", "c", "c2"] and maps.config.targets["c2"].roi == "lateral"
    test = load_trials(decoding_world.data, 1, "test").with_format("numpy")
    decoded = maps.predict(np.asarray(test["betas"][:3]))
    assert decoded["c2"].shape == decoded["c"].shape
    card = (tmp_path / "m" / "README.md").read_text()
    assert "**c2**" in card and "c2: 2-way identification" in card and "| c2 |" in card
    # evaluation: the reconstructions keep every decoded target, and retrieval scores each
    reconstruct_trials(Reconstructor(tiny), maps, decoding_world.data, 1, tmp_path / "recon", rows=[0, 1, 2],
                       sampling=Sampling(num_inference_steps=2), progress=False)  # fmt: skip
    results = evaluate(tmp_path / "recon", names=["pixcorr"], features=features)
    assert set(results["retrieval"]["subj01"]) == {"z", "c", "c2"}
    # the app's quality table has a row per target
    quality = Subject(1, maps, str(decoding_world.data)).quality(0)
    report = app_module.quality_report(quality, ["a caption"])
    assert "| z (image latent) |" in report and "| c2 |" in report


def _shrunk_problem(seed=0):
    """Noisy voxels -> targets: ridge predictions on new trials have far less spread than the targets."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((40, 6))

    def trials(n):
        signal = rng.standard_normal((n, 40)).astype(np.float32)
        return signal + 3.0 * rng.standard_normal((n, 40)).astype(np.float32), signal @ weights + 5.0

    return trials(600), trials(400)


@pytest.mark.parametrize("mode", ["dimension", "target"])
def test_rescaled_predictions_have_the_training_spread(mode):
    (betas, targets), (new_betas, new_targets) = _shrunk_problem()
    fitted, _ = fit_linear_map(betas, targets, np.arange(40), np.zeros((40, 3)), np.arange(600), device="cpu")
    plain = fitted.predict(torch.from_numpy(new_betas)).numpy()
    rescaled = fitted.rescale(torch.from_numpy(plain), mode).numpy()
    assert np.all(plain.std(0) < 0.8 * new_targets.std(0))  # ridge shrinks towards the mean
    # within the folds' bias: a fold fits on 4/5 of the trials, so a heavily penalised dimension's out-of-fold
    # predictions spread up to 5/4 less than the final fit's
    if mode == "dimension":
        np.testing.assert_allclose(rescaled.std(0), targets.std(0), rtol=0.25)
    else:
        assert np.sqrt(np.mean(rescaled.std(0) ** 2)) == pytest.approx(np.sqrt(np.mean(targets.std(0) ** 2)), rel=0.25)
    np.testing.assert_allclose(rescaled.mean(0), new_targets.mean(0), atol=0.3 * new_targets.std(0).mean())
    # a monotone map per dimension: identification and correlations are those of the plain predictions
    np.testing.assert_allclose(np.corrcoef(rescaled[:, 0], plain[:, 0])[0, 1], 1.0, rtol=1e-5)


def test_rescaling_statistics_come_from_training_data_only(decoding_world, tmp_path, monkeypatch):
    """The statistics are fitted with the maps, without the test set: other test betas leave them as they were."""
    import brainldm.decoding.fit as maps_module

    real = maps_module.load_trials

    def other_test_betas(data, subject, split):
        trials = real(data, subject, split)
        if split != "test":
            return trials
        noise = np.random.default_rng(5).standard_normal((len(trials), len(trials[0]["betas"]))).astype(np.float32)
        return trials.map(lambda row, i: {"betas": noise[i]}, with_indices=True)

    monkeypatch.setattr(maps_module, "load_trials", other_test_betas)
    refit = fit_subject_maps(decoding_world.data, decoding_world.features, 1, device="cpu")
    original = decoding_world.maps
    assert refit.config.scores["z"]["identification"] < original.config.scores["z"]["identification"]  # it took
    for name in ("z", "c"):
        for field in ("target_mean", "target_std", "prediction_mean", "prediction_std"):
            assert torch.equal(getattr(refit[name], field), getattr(original[name], field))
        assert refit.config.targets[name].spread == original.config.targets[name].spread


def test_rescaling_round_trips_and_is_applied_on_request(decoding_world, tmp_path):
    maps = decoding_world.maps
    loaded = SubjectMaps.from_pretrained(maps.save_pretrained(tmp_path / "m"))
    betas, _ = _test_betas(decoding_world)
    for name in ("z", "c"):
        for field in ("target_mean", "target_std", "prediction_mean", "prediction_std"):
            assert torch.equal(getattr(loaded[name], field), getattr(maps[name], field))
        spread = loaded.config.targets[name].spread
        assert spread["prediction_std"] < spread["target_std"]
    plain, rescaled = loaded.predict(betas), loaded.predict(betas, rescale="target")
    for name in ("z", "c"):  # one factor per target: deviations from the predictions' mean grow by its ratio
        spread = loaded.config.targets[name].spread
        mine = loaded[name]
        deviation = (
            (plain[name].reshape(len(betas), -1) - mine.prediction_mean)
            * spread["target_std"]
            / spread["prediction_std"]
        )
        torch.testing.assert_close(
            rescaled[name].reshape(len(betas), -1), deviation + mine.target_mean, rtol=1e-4, atol=1e-4
        )
    with pytest.raises(InputError, match="rescale must be None or one of"):
        loaded.predict(betas, rescale="test")


def test_maps_saved_before_rescaling_load_as_they_are(decoding_world, tmp_path):
    """Maps from before the rescaling statistics: no such tensors, no spread in the config. They load and predict
    as before, and asking them to rescale says to refit."""
    from safetensors.torch import load_file, save_file

    folder = decoding_world.maps.save_pretrained(tmp_path / "old")
    tensors = load_file(folder / "maps.safetensors")
    stats = ("target_mean", "target_std", "prediction_mean", "prediction_std")
    old = {k: v for k, v in tensors.items() if k.split(".")[-1] not in stats}
    save_file(old, folder / "maps.safetensors", metadata={"format": "brainldm-subject-maps/2"})
    config = json.loads((folder / "config.json").read_text())
    for target in config["targets"].values():
        del target["spread"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = SubjectMaps.from_pretrained(folder)
    betas, _ = _test_betas(decoding_world)
    plain = decoding_world.maps.predict(betas)
    assert all(torch.equal(loaded.predict(betas)[n], plain[n]) for n in ("z", "c"))
    with pytest.raises(InputError, match="carry no rescaling statistics.*refit"):
        loaded.predict(betas, rescale="dimension")
