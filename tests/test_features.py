"""LDM features: z, c, zc and U-Net taps; their store (cache, resume); and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from brainldm.features import (
    FeatureSpec,
    FeatureStore,
    encode_c,
    encode_prompts,
    encode_z,
    extract_features,
    img2img_latents,
    load_features,
    parse_features,
    to_rgb_array,
)
from brainldm.validation import InputError


@pytest.fixture(scope="module")
def pictures():
    from brainldm.synthetic import draw_picture

    rng = np.random.default_rng(0)
    return [draw_picture(rng, 48) for _ in range(5)]  # (image, captions) pairs


def test_z_and_c_shapes_come_from_the_model(tiny, pictures):
    z = encode_z(tiny, [p for p, _ in pictures])
    c = encode_c(tiny, [caps for _, caps in pictures])
    assert z.shape == (5, 4, 40, 40) and z.dtype == torch.float32
    assert c.shape == (5, 77, tiny.text_encoder.config.hidden_size)


def test_z_is_deterministic_and_batch_independent(tiny, pictures):
    images = [p for p, _ in pictures]
    batched = encode_z(tiny, images)
    assert torch.equal(batched, encode_z(tiny, images))
    one_by_one = torch.cat([encode_z(tiny, [im]) for im in images])
    torch.testing.assert_close(batched, one_by_one, atol=1e-3, rtol=1e-3)  # float summation order only


def test_c_of_one_caption_equals_the_pipeline_prompt_embedding(tiny):
    prompt = "A red circle and a blue square on a green field."
    ours = encode_c(tiny, [[prompt]])
    theirs, _ = tiny.encode_prompt(prompt, torch.device("cpu"), 1, False)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_c_averages_over_each_images_own_captions(tiny):
    captions = [["a cat on a mat", "a sleeping cat"], ["a red bus"], ["two dogs", "a dog", "dogs playing"]]
    c = encode_c(tiny, captions)
    for i, caps in enumerate(captions):
        torch.testing.assert_close(c[i], encode_prompts(tiny, caps).mean(0))
    assert not torch.allclose(c[0], c[1])


def test_zc_near_zero_strength_is_close_to_z_and_moves_away_with_noise(tiny, pictures):
    z = encode_z(tiny, [p for p, _ in pictures[:2]])
    c = encode_c(tiny, [caps for _, caps in pictures[:2]])
    near, _ = img2img_latents(tiny, z, c, [0, 1], strength=0.02)
    far, _ = img2img_latents(tiny, z, c, [0, 1], strength=0.6, num_inference_steps=10)
    assert near.shape == z.shape
    assert (near - z).norm() / z.norm() < 0.1
    assert (far - z).norm() > 3 * (near - z).norm()


def test_zc_guidance_is_against_the_empty_prompt(tiny, pictures):
    """c equal to the embedding of "" leaves guidance nothing to push toward: zc at guidance 5 is zc at 1."""
    z, empty = encode_z(tiny, [p for p, _ in pictures[:2]]), encode_prompts(tiny, ["", ""])
    guided, _ = img2img_latents(tiny, z, empty, [0, 1], strength=0.6, num_inference_steps=10, guidance_scale=5.0)
    plain, _ = img2img_latents(tiny, z, empty, [0, 1], strength=0.6, num_inference_steps=10, guidance_scale=1.0)
    torch.testing.assert_close(guided, plain, atol=1e-4, rtol=1e-4)


def test_zc_is_deterministic_per_image_whatever_the_batch(tiny, pictures):
    z = encode_z(tiny, [p for p, _ in pictures[:3]])
    c = encode_c(tiny, [caps for _, caps in pictures[:3]])
    together, _ = img2img_latents(tiny, z, c, [10, 11, 12], strength=0.5, num_inference_steps=10)
    alone, _ = img2img_latents(tiny, z[1:2], c[1:2], [11], strength=0.5, num_inference_steps=10)
    torch.testing.assert_close(together[1:2], alone, atol=1e-4, rtol=1e-4)
    other_seed, _ = img2img_latents(tiny, z, c, [10, 11, 12], strength=0.5, num_inference_steps=10, seed=1)
    assert not torch.allclose(together, other_seed)


def test_unet_taps_record_the_named_block_at_the_named_step(tiny, pictures):
    z = encode_z(tiny, [p for p, _ in pictures[:2]])
    c = encode_c(tiny, [caps for _, caps in pictures[:2]])
    specs = [FeatureSpec.parse(s) for s in ("unet.mid@0.5#1", "unet.mid@0.5#5", "unet.up0@0.5#2")]
    seen = []
    hook = tiny.unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out.chunk(2)[1].mean((2, 3))))
    try:
        _, taps = img2img_latents(tiny, z, c, [0, 1], strength=0.5, num_inference_steps=10, taps=specs)
    finally:
        hook.remove()
    assert len(seen) == 5  # 10 steps x 0.5
    torch.testing.assert_close(taps["unet.mid@0.5#1"], seen[0])
    torch.testing.assert_close(taps["unet.mid@0.5#5"], seen[4])
    assert taps["unet.up0@0.5#2"].shape == (2, tiny.unet.config.block_out_channels[-1])
    with pytest.raises(InputError, match="runs only 5 of 10 steps"):
        img2img_latents(tiny, z, c, [0, 1], 0.5, 10, taps=[FeatureSpec.parse("unet.mid@0.5#6")])
    with pytest.raises(InputError, match="has 2 down blocks"):
        img2img_latents(tiny, z, c, [0, 1], 0.5, 10, taps=[FeatureSpec.parse("unet.down3@0.5#1")])


@pytest.mark.parametrize("text", ["zc@0", "zc@1.5", "unet.side@0.5#1", "unet.mid@0.5#0", "w", "zc@x"])
def test_bad_feature_specs_are_rejected(text):
    with pytest.raises(InputError, match="feature"):
        parse_features(text)


def test_feature_names_round_trip():
    names = ["z", "c", "zc@0.2", "unet.mid@0.8#10"]
    assert [s.name for s in parse_features(",".join(names + ["z"]))] == names


def test_images_of_other_modes_are_converted_and_the_rest_rejected():
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    for image in (Image.fromarray(rgb).convert("L"), Image.fromarray(rgb).convert("CMYK"), rgb[..., 0], rgb / 255.0):
        assert to_rgb_array(image).shape == (8, 8, 3)
    np.testing.assert_array_equal(to_rgb_array(np.dstack([rgb, rgb[..., :1]])), rgb)  # RGBA drops alpha
    for bad in (rgb[..., :2], rgb[None], rgb.astype(np.float32) * 3, rgb.astype(np.int64)):
        with pytest.raises(InputError, match="expected"):
            to_rgb_array(bad)


def test_an_image_without_captions_is_an_error(tiny):
    with pytest.raises(InputError, match="image 1 has no captions"):
        encode_c(tiny, [["a cat"], []])


# --- the store: cache hits, resume, mismatches ----------------------------------------------------------------


def _items(pictures):
    return {100 + i: pair for i, pair in enumerate(pictures)}


def test_extraction_caches_per_image_and_reruns_compute_nothing(tiny, pictures, tmp_path, monkeypatch):
    items = _items(pictures)
    specs = parse_features("z,c,zc@0.3")
    stores = extract_features(
        tiny,
        "tiny",
        list(items),
        items.__getitem__,
        specs,
        tmp_path,
        batch_size=2,
        num_inference_steps=10,
        progress=False,
    )
    assert {name: len(s.index) for name, s in stores.items()} == {"z": 5, "c": 5, "zc@0.3": 5}
    z = load_features(tmp_path, "z", [103, 100])
    torch.testing.assert_close(torch.from_numpy(z), encode_z(tiny, [pictures[3][0], pictures[0][0]]))

    monkeypatch.setattr("brainldm.features.encode_z", lambda *a, **k: pytest.fail("recomputed a cached image"))
    extract_features(
        tiny, "tiny", list(items), items.__getitem__, specs, tmp_path, num_inference_steps=10, progress=False
    )


def test_a_killed_extraction_resumes_with_the_same_result(tiny, pictures, tmp_path):
    items = _items(pictures)
    specs = parse_features("z,c")

    def dying(nsd_id):
        if nsd_id == 103:
            raise KeyboardInterrupt
        return items[nsd_id]

    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny, "tiny", list(items), dying, specs, tmp_path / "a", batch_size=2, progress=False)
    assert FeatureStore(tmp_path / "a", "z").missing(list(items)) == [102, 103, 104]
    computed = []

    def counting(nsd_id):
        computed.append(nsd_id)
        return items[nsd_id]

    extract_features(tiny, "tiny", list(items), counting, specs, tmp_path / "a", batch_size=2, progress=False)
    assert computed == [102, 103, 104]
    extract_features(tiny, "tiny", list(items), items.__getitem__, specs, tmp_path / "b", batch_size=5, progress=False)
    for name in ("z", "c"):
        np.testing.assert_allclose(
            load_features(tmp_path / "a", name, list(items)),
            load_features(tmp_path / "b", name, list(items)),
            atol=1e-3,  # batches of 2 vs 5: float summation order only
        )


def test_store_refuses_features_of_another_model(tiny, pictures, tmp_path):
    items = _items(pictures[:1])
    extract_features(tiny, "tiny", list(items), items.__getitem__, parse_features("z"), tmp_path, progress=False)
    with pytest.raises(InputError, match="other settings \\(model"):
        extract_features(
            tiny, "other/model", list(items), items.__getitem__, parse_features("z"), tmp_path, progress=False
        )


def test_missing_ids_and_corrupt_shards_are_named(tiny, pictures, tmp_path):
    items = _items(pictures[:2])
    extract_features(tiny, "tiny", list(items), items.__getitem__, parse_features("z"), tmp_path, progress=False)
    with pytest.raises(InputError, match="missing for 1 of 2 images \\(e.g. nsd_id 7\\)"):
        load_features(tmp_path, "z", [100, 7])
    with pytest.raises(InputError, match="no c features"):
        load_features(tmp_path, "c", [100])
    shard = next((tmp_path / "z").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(InputError, match="could not read feature shard"):
        load_features(tmp_path, "z", [100])


def test_extract_features_script_on_a_prepared_subject(nsd_tree, tmp_path, capsys):
    import subprocess
    import sys

    from brainldm.data import prepare_subject

    prepare_subject(nsd_tree.root, 1, tmp_path / "trials", sessions=1, progress=False)
    script = ["scripts/extract_features.py", "--data", str(tmp_path / "trials"), "--subject", "1"]
    run = subprocess.run(
        [sys.executable, *script, "--model", "tiny", "--out", str(tmp_path / "f"), "--features", "z,c"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    from brainldm.data import SubjectStimuli

    ids = SubjectStimuli(tmp_path / "trials", 1).nsd_ids
    assert load_features(tmp_path / "f", "c", ids).shape == (len(ids), 77, 32)
    np.testing.assert_allclose(load_features(tmp_path / "f", "z", ids[:2]), nsd_tree.features(ids[:2], "z"), atol=1e-4)
    # a bad feature name, in this process (the run above showed the script runs as a script)
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract_features", "scripts/extract_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as bad:
        module.main([*script[1:], "--model", "tiny", "--out", str(tmp_path / "f"), "--features", "zc@7"])
    assert bad.value.code == 2 and "error: bad feature 'zc@7'" in capsys.readouterr().err
