"""The follow-up pipeline: BLIP captions and DPT depth from (true or decoded) features, SD-2-depth conditioned on the
depth map it is given, wide targets fitted a block at a time, and Xzt / Xztd end to end through the scripts."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from brainldm.images import PREPROCESSING
from brainldm.ldm.captioner import (
    TAKAGI_CAPTIONS,
    blip_embeddings,
    captions_from_embeddings,
    pixel_values,
    strip_prompt,
)
from brainldm.ldm.depth import depth_from_states, depth_img2img, dpt_states
from brainldm.offline.toy_parts import draw_pairs
from brainldm.offline.twins import tiny_depth_ldm, tiny_depth_model
from brainldm.presets import Sampling
from brainldm.validation import InputError

FAST = Sampling(num_inference_steps=5)
STREAMS6 = "early+ventral+midventral+midlateral+lateral+parietal"


def script(name: str):
    """``scripts/<name>.py`` as a module, to run its ``main`` in this process."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pictures():
    return list(draw_pairs(6, 11, 128)[0])


@pytest.fixture(scope="module")
def captioner():
    from brainldm.ldm.captioner import load_captioner

    return load_captioner("tiny", device="cpu")


def test_a_caption_from_the_true_embedding_is_the_captioners_own(captioner, pictures):
    settings = TAKAGI_CAPTIONS
    embeddings = blip_embeddings(captioner, pictures)
    assert tuple(embeddings.shape) == (len(pictures), *captioner.embedding_shape)
    ours = captions_from_embeddings(captioner, embeddings)
    # BLIP's own generate, from the pictures, with the reference code's prompt and beam search
    prompt = captioner.tokenizer([settings.prompt] * len(pictures), return_tensors="pt").input_ids
    with torch.no_grad():
        ids = captioner.model.generate(
            pixel_values=pixel_values(pictures, captioner.image_size), input_ids=prompt, interpolate_pos_encoding=True,
            num_beams=3, min_length=5, max_length=20, repetition_penalty=1.5,
        )  # fmt: skip
    assert ours == strip_prompt(captioner.tokenizer, ids, settings.prompt)
    assert len(set(ours)) >= 3  # the captions depend on the picture, so the comparison above could fail
    assert captions_from_embeddings(captioner, embeddings.roll(1, 0)) != ours
    with pytest.raises(InputError, match="BLIP embeddings must be"):
        captions_from_embeddings(captioner, embeddings[:, :5])


def test_a_depth_map_from_the_true_states_is_dpts_own_prediction(pictures):
    model = tiny_depth_model()
    states, depth = dpt_states(model, pictures)
    assert states.shape == (len(pictures), 4, 17, 32)
    torch.testing.assert_close(depth_from_states(model, states), depth, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(depth_from_states(model, states.roll(1, 0)), depth, atol=1e-3)
    with pytest.raises(InputError, match="DPT states must be"):
        depth_from_states(model, states[:, :3])


def test_the_depth_pipeline_follows_the_depth_map_it_is_given(pictures):
    pipe = tiny_depth_ldm()
    assert pipe.depth_estimator is None  # nothing inside it can estimate depth from the init image
    _, depth = dpt_states(tiny_depth_model(), pictures[:2])
    init = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a zebra", "a tiger"]
    a = depth_img2img(pipe, init, prompts, depth, FAST)
    np.testing.assert_array_equal(a, depth_img2img(pipe, init, prompts, depth.clone(), FAST))
    flipped = depth_img2img(pipe, init, prompts, depth.flip(-1), FAST)
    assert np.abs(a - flipped).mean() > 1e-3
    with pytest.raises(InputError, match="differ in number"):
        depth_img2img(pipe, init, prompts[:1], depth, FAST)


@pytest.mark.parametrize("n_trials,n_voxels", [(80, 25), (24, 60)])  # more trials than voxels, and fewer (NSD's)
def test_a_reduced_rank_map_fitted_a_block_at_a_time_is_the_dense_maps_reduction(n_trials, n_voxels):
    from brainldm.decoding.fit import fit_linear_map
    from brainldm.decoding.ridge import reduced_rank

    rng = np.random.default_rng(0)
    betas = rng.standard_normal((n_trials, n_voxels)).astype(np.float32)
    targets = betas[:, :6] @ rng.standard_normal((6, 40)) + rng.standard_normal((n_trials, 40))
    targets = targets.astype(np.float32)
    args = (np.arange(n_voxels), np.zeros((n_voxels, 3)), np.arange(n_trials) // 2)
    dense, cv_r = fit_linear_map(betas, targets, *args, device="cpu")
    blocks = lambda: (targets[:, start : start + 7] for start in range(0, 40, 7))  # noqa: E731
    low, low_cv_r = fit_linear_map(betas, blocks, *args, rank=5, device="cpu")
    assert low.rank == 5 and low_cv_r == pytest.approx(cv_r)
    torch.testing.assert_close(low.intercept, dense.intercept)
    torch.testing.assert_close(low.prediction_std, dense.prediction_std)
    x = torch.from_numpy((betas - betas.mean(0)) / betas.std(0))
    left, right = reduced_rank(dense.weight.double(), (x.T @ x).double(), 5)
    torch.testing.assert_close((low.left @ low.right).double(), left @ right, rtol=1e-3, atol=1e-4)


def test_dpt_targets_are_read_in_blocks_whose_weights_fit_as_well_as_the_targets(tmp_path):
    """Found by the rehearsal: a subject with 27 training trials and NSD's 16,188 voxels read DPT's 2.4 million targets
    in one block (27 x 2.4M values fit 1 GiB), whose ridge weights (16,188 x 2.4M) took 150 GB. Where weights are
    formed, blocks are sized by the larger of images and voxels (a reduced-rank map with fewer trials than voxels now
    forms none: see the trial-space test above)."""
    from brainldm.data.features import FeatureStore
    from brainldm.decoding.fit import block_values

    store = FeatureStore(tmp_path, "dpt", config={"model_id": "random-dpt-large"})
    store.write([0, 1], np.zeros((2, 4, 577, 1024), np.float16))  # DPT-large's hidden states at 384 px
    n_images, n_voxels, budget = 27, 16_188, 2**28
    widths = [
        int(np.prod([s.stop - s.start for s in index]) * np.prod(store.feature_shape[len(index) :]))
        for index in store.block_index(n_images, block_values(n_images, n_voxels))
    ]
    assert sum(widths) == 4 * 577 * 1024  # every target read once
    assert max(widths) * n_voxels <= budget and max(widths) * n_images <= budget
    assert block_values(50_000, n_voxels) == budget  # more images than voxels: sized by the images, as before


def test_a_union_of_rois_holds_each_of_them(decoding_world):
    from brainldm.data.trials import load_voxels

    voxels = load_voxels(decoding_world.data, 1)
    union = voxels.roi("early+ventral")
    assert np.array_equal(union, np.union1d(voxels.roi("early"), voxels.roi("ventral")))
    with pytest.raises(InputError, match="unknown ROI 'v9'"):
        voxels.roi("early+v9")


@pytest.fixture(scope="module")
def followup_world(decoding_world, tmp_path_factory):
    """The decoding world's features plus blip and dpt from the tiny captioner and depth model, and maps that decode
    all four (blip and dpt from six streams, at a reduced rank)."""
    root = tmp_path_factory.mktemp("followup")
    features = root / "features"
    shutil.copytree(decoding_world.features, features)
    script("extract_features").main(
        ["--data", str(decoding_world.data), "--subjects", "1", "--model", "tiny", "--out", str(features),
         "--features", "blip,dpt", "--captioner", "tiny", "--depth-model", "tiny", "--device", "cpu"]
    )  # fmt: skip
    script("fit_maps").main(
        ["--data", str(decoding_world.data), "--features", str(features), "--subject", "1", "--out",
         str(root / "maps"), "--decoders", f"z=early,c=ventral,blip={STREAMS6},dpt={STREAMS6}",
         "--ranks", "blip=8", "--device", "cpu"]
    )  # fmt: skip
    return root, features


def test_blip_and_dpt_are_stored_with_their_own_models_and_decoded_at_a_reduced_rank(followup_world):
    from safetensors import safe_open

    from brainldm.data.features import FeatureStore
    from brainldm.decoding.maps import SubjectMaps

    root, features = followup_world
    blip = FeatureStore(features, "blip")
    assert blip.config == {"model_id": "tiny", "feature": "blip", "image_size": 240, "dtype": "float16",
                           "preprocessing": PREPROCESSING["blip"]}  # fmt: skip
    assert blip.feature_shape == (226, 32)  # 15 x 15 patches and the class token, at the reference code's 240 px
    dpt = FeatureStore(features, "dpt")
    assert dpt.feature_shape == (4, 17, 32)
    # the wide targets are kept in half precision (DPT's: 47 GB for NSD's 10,000 pictures) and read as float32
    shard = next(dpt.folder.glob("shard-*.safetensors"))
    with safe_open(str(shard), framework="numpy") as f:
        assert f.get_slice("features").get_dtype() == "F16"
    ids = sorted(dpt.index)[:3]
    assert dpt.load(ids).dtype == np.float32 and np.abs(dpt.load(ids)).max() > 0
    maps = SubjectMaps.from_pretrained(root / "maps")
    assert maps.config.targets["blip"].rank == 8 and maps.config.targets["blip"].roi == STREAMS6
    assert maps.config.targets["dpt"].model_id == "tiny" and maps.config.targets["z"].model_id is None
    assert maps.config.model_id == "tiny"
    # each map says how its target's pictures were prepared (as the reference code, docs/pipeline.md)
    for name in ("z", "c", "blip", "dpt"):
        assert maps.config.targets[name].preprocessing == PREPROCESSING[name]
        assert FeatureStore(features, name).config["preprocessing"] == PREPROCESSING[name]


def test_pictures_are_prepared_as_the_reference_code_prepares_them():
    """blip: Lanczos to 240 px, pixels in [0, 1] unnormalised (img2feat_blip.py); dpt: Lanczos to 512 px, then
    bicubic to the model's size and DPT's normalisation (img2feat_dpt.py); z: Lanczos (img2feat_sd.py)."""
    from PIL import Image

    from brainldm.images import images_to_tensor
    from brainldm.ldm.depth import _pixel_values

    picture = np.random.default_rng(0).integers(0, 256, (425, 425, 3), dtype=np.uint8)
    lanczos = np.asarray(Image.fromarray(picture).resize((240, 240), Image.Resampling.LANCZOS))
    expected = torch.from_numpy(lanczos).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(pixel_values([picture], 240)[0], expected)
    torch.testing.assert_close(images_to_tensor([picture], 240)[0], expected * 2 - 1)
    model = tiny_depth_model()
    size = model.config.image_size
    at_512 = Image.fromarray(picture).resize((512, 512), Image.Resampling.LANCZOS)
    twice = np.asarray(at_512.resize((size, size), Image.Resampling.BICUBIC))
    torch.testing.assert_close(_pixel_values(model, [picture])[0], torch.from_numpy(twice).permute(2, 0, 1) / 127.5 - 1)


def test_reconstruct_and_evaluate_make_and_score_xzt_and_xztd(followup_world, decoding_world, tmp_path):
    root, _ = followup_world
    out = tmp_path / "recon"
    script("reconstruct").main(
        ["--maps", str(root / "maps"), "--data", str(decoding_world.data), "--subject", "1", "--trials", "0:3",
         "--out", str(out), "--steps", "5", "--depth-ldm", "tiny", "--output-size", "64"]
    )  # fmt: skip
    trial = out / "subj01" / "test-00000"
    meta = json.loads((trial / "meta.json").read_text())
    assert (trial / "caption.txt").read_text().strip() == meta["decoded_caption"] != ""
    assert meta["followup"] == {"captioner": "tiny", "depth_model": "tiny", "depth_ldm": "tiny"}
    for name in ("Xzt_0", "Xztd_0", "depth"):
        assert (trial / f"{name}.png").is_file()
    assert not (trial / "blip.npy").exists() and (trial / "depth.npy").is_file()
    script("evaluate").main(["--recon", str(out), "--out", str(tmp_path / "metrics"), "--metrics", "pixcorr,ssim"])
    rows = json.loads((tmp_path / "metrics" / "metrics.json").read_text())["average"]
    assert {"Xz", "Xc", "Xzc", "Xzt", "Xztd"} <= set(rows)
    assert all(np.isfinite(rows[kind]["pixcorr"]) for kind in ("Xzt", "Xztd"))


def test_the_app_shows_the_caption_decoded_from_the_brain(followup_world, decoding_world):
    import app as app_module
    from brainldm.demo import DemoBackend, Sources
    from brainldm.ldm.captioner import captioner_for

    root, _ = followup_world
    sources = Sources(str(root / "maps"), str(decoding_world.data), "tiny", [1])
    backend = DemoBackend(sources, device="cpu", output_size=64)
    out = backend.reconstruct(1, 2, FAST)
    state = backend.subject(1)
    expected = captions_from_embeddings(captioner_for(state.maps.config.targets["blip"]), state.decode(2)["blip"])
    assert out["decoded_caption"] == expected[0]
    report = app_module.quality_report(out["quality"], out["captions"], out["decoded_caption"])
    assert f"**Caption decoded from the brain** (BLIP, from the decoded image embedding): {expected[0]}" in report
    assert "| BLIP image embedding |" in report
    # maps without blip: no caption line
    assert "decoded from the brain" not in app_module.quality_report(out["quality"], out["captions"])


def _run(name: str, args: list, capsys) -> tuple[int, str]:
    """``scripts/<name>.py`` in this process -> (exit status, stderr)."""
    capsys.readouterr()
    try:
        script(name).main([str(a) for a in args])
        return 0, capsys.readouterr().err
    except SystemExit as exit:
        return exit.code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and "error:" in lines[-1] and "Traceback" not in err, err
    return lines[-1]


def test_a_folder_of_follow_up_trials_refuses_trials_without_it_and_evaluate_names_mixed_kinds(
    followup_world, decoding_world, tmp_path, capsys
):
    root, _ = followup_world
    out = tmp_path / "recon"
    common = ["--maps", root / "maps", "--data", decoding_world.data, "--subject", "1", "--out", out, "--steps", "2"]
    assert _run("reconstruct", [*common, "--trials", "0:1", "--depth-ldm", "tiny"], capsys)[0] == 0
    code, err = _run("reconstruct", [*common, "--trials", "0:2", "--no-followup"], capsys)
    assert code == 2 and "test-00000 was made with followup" in _one_error_line(err)
    assert not (out / "subj01" / "test-00001").exists()
    # a trial beyond --trials counts too: the folder holds one kind of reconstruction
    code, err = _run("reconstruct", [*common, "--trials", "1:2", "--no-followup"], capsys)
    assert code == 2 and "test-00000 was made with followup" in _one_error_line(err)
    # a folder mixed another way (here by hand) is named by evaluate, which scores every kind by default
    shutil.copytree(out / "subj01" / "test-00000", out / "subj01" / "test-00001")
    for kind in ("Xzt_0", "Xztd_0"):
        (out / "subj01" / "test-00001" / f"{kind}.png").unlink()
    code, err = _run("evaluate", ["--recon", out, "--out", tmp_path / "metrics", "--metrics", "pixcorr"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "holds Xzt, Xztd in 1 of its 2 trials only" in line and "--kinds Xz,Xc,Xzc" in line
    assert not (tmp_path / "metrics").exists()


def test_a_missing_depth_ldm_is_one_error_line_naming_its_flag(followup_world, decoding_world, tmp_path, capsys):
    root, _ = followup_world
    args = ["--maps", root / "maps", "--data", decoding_world.data, "--subject", "1", "--out", tmp_path / "recon",
            "--trials", "0:1", "--steps", "2", "--depth-ldm", tmp_path / "nowhere"]  # fmt: skip
    code, err = _run("reconstruct", args, capsys)
    line = _one_error_line(err)
    assert code == 2 and "--depth-ldm" in line and "nowhere" in line and "--model" not in line
    code, err = _run("reconstruct", [*args[:-2], "--model", "someone/not-a-cached-model"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "--model 'someone/not-a-cached-model' is not in the Hugging Face cache" in line
    assert not (tmp_path / "recon").exists()


@pytest.mark.parametrize("size", ["4", "250", "100000"])
def test_a_blip_image_size_blip_cannot_take_is_refused_and_stamps_nothing(size, decoding_world, tmp_path, capsys):
    out = tmp_path / "features"
    args = ["--data", decoding_world.data, "--subjects", "1", "--model", "tiny", "--out", out, "--features", "blip",
            "--captioner", "tiny", "--device", "cpu"]  # fmt: skip
    code, err = _run("extract_features", [*args, "--blip-image-size", size], capsys)
    assert code == 2 and "--blip-image-size must be a multiple of the captioner's 16-px patch" in _one_error_line(err)
    assert f"got {size}" in err and not (out / "blip").exists()


def test_decoders_naming_a_target_twice_or_leaving_out_c_are_refused(followup_world, decoding_world, tmp_path, capsys):
    _, features = followup_world
    common = ["--data", decoding_world.data, "--features", features, "--subject", "1", "--out", tmp_path / "maps"]
    code, err = _run("fit_maps", [*common, "--decoders", "z=early,c=ventral,z=ventral"], capsys)
    assert code == 2 and "--decoders: 'z=early,c=ventral,z=ventral' names z more than once" in _one_error_line(err)
    code, err = _run("fit_maps", [*common, "--decoders", "z=early"], capsys)
    assert code == 2 and "leaves out what every reconstruction needs: add c=ventral" in _one_error_line(err)
    assert not (tmp_path / "maps").exists()


def test_maps_without_c_are_refused_by_reconstruct_before_any_work(decoding_world, tmp_path):
    from brainldm.decoding.fit import fit_subject_maps
    from brainldm.ldm.loading import load_ldm
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.reconstruction.job import reconstruct_trials

    maps = fit_subject_maps(decoding_world.data, decoding_world.features, 1, decoders=(("z", "early"),), device="cpu")
    with pytest.raises(InputError, match=r"maps decode \['z'\], without c, which every reconstruction needs"):
        reconstruct_trials(Reconstructor(load_ldm("tiny", device="cpu")), maps, decoding_world.data, 1, tmp_path / "o")
    assert not (tmp_path / "o").exists()
