"""LDM features: z, c, zc and U-Net taps; their store (cache, resume); and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from brainldm.data.features import FeatureSpec, FeatureStore, load_features, parse_features
from brainldm.images import to_rgb_array
from brainldm.ldm.extraction import extract_features
from brainldm.ldm.features import encode_c, encode_prompts, encode_z, img2img_latents
from brainldm.validation import InputError


@pytest.fixture(scope="module")
def pictures():
    from brainldm.offline.synthetic import draw_picture

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

    monkeypatch.setattr("brainldm.ldm.extraction.encode_z", lambda *a, **k: pytest.fail("recomputed a cached image"))
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


def _store_files(root, names):
    """{feature: [(shard file name, its nsd_ids, its features)]}: a store as it is on disk."""
    from safetensors.numpy import load_file

    out = {}
    for name in names:
        shards = sorted((root / name).glob("*.safetensors"))
        out[name] = [(s.name, *(load_file(s)[k] for k in ("nsd_id", "features"))) for s in shards]
    return out


def _as_processes(tiny, run, n=2) -> list:
    """``run(rank, ldm, wait_for_everyone)`` in n threads at once, each with its own copy of the model (U-Net taps
    hook the model) and a real barrier: processes of one run, as accelerate starts them."""
    import copy
    import threading

    barrier, results, errors = threading.Barrier(n, timeout=120), [None] * n, []

    def target(rank, ldm):
        try:
            results[rank] = run(rank, ldm, barrier.wait)
        except BaseException as err:  # noqa: BLE001 (re-raised below, in the test's thread)
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(k, copy.deepcopy(tiny))) for k in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_sharded_extraction_writes_the_store_one_process_writes(tiny, pictures, tmp_path):
    items = _items(pictures)
    specs = parse_features("z,c,unet.mid@0.5#1")
    kwargs = dict(batch_size=2, num_inference_steps=4, progress=False, unet_reduce="pool2")
    extract_features(tiny, "tiny", list(items), items.__getitem__, specs, tmp_path / "one", **kwargs)
    seen = {0: [], 1: []}

    def run(rank, ldm, wait_for_everyone):
        def get_item(nsd_id):
            seen[rank].append(nsd_id)
            return items[nsd_id]

        return extract_features(
            ldm, "tiny", list(items), get_item, specs, tmp_path / "two", process_index=rank, num_processes=2,
            wait_for_everyone=wait_for_everyone, **kwargs,
        )  # fmt: skip

    stores = _as_processes(tiny, run)[0]
    assert seen == {0: [100, 101, 104], 1: [102, 103]}  # batches 0 and 2 to process 0, batch 1 to process 1
    assert stores["z"].written == 3
    one, two = _store_files(tmp_path / "one", stores), _store_files(tmp_path / "two", stores)
    assert [[f[0] for f in files] for files in two.values()] == [["shard-00000.safetensors", "shard-00001.safetensors",
                                                                  "shard-00002.safetensors"]] * 3  # fmt: skip
    for name in stores:
        for (file_one, ids_one, features_one), (file_two, ids_two, features_two) in zip(one[name], two[name]):
            assert file_one == file_two and ids_one.tolist() == ids_two.tolist()
            np.testing.assert_array_equal(features_one, features_two)
    assert two["unet.mid@0.5#1"][0][2].shape == (2, tiny.unet.config.block_out_channels[-1] * 4)  # pool2: C x 2 x 2


def test_a_killed_sharded_extraction_resumes(tiny, pictures, tmp_path):
    items = _items(pictures)
    specs = parse_features("z,c")
    sharded = dict(batch_size=1, progress=False, num_processes=2, wait_for_everyone=lambda: None)

    def dying(nsd_id):  # process 1 is killed in its second batch; process 0 with it, before its first
        if nsd_id == 103:
            raise KeyboardInterrupt
        return items[nsd_id]

    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny, "tiny", list(items), dying, specs, tmp_path, process_index=1, **sharded)
    assert FeatureStore(tmp_path, "z").missing(list(items)) == [100, 102, 103, 104]  # 101 was kept, as a part
    computed = []

    def counting(nsd_id):
        computed.append(nsd_id)
        return items[nsd_id]

    def run(rank, ldm, wait_for_everyone):
        extract_features(
            ldm, "tiny", list(items), counting, specs, tmp_path, process_index=rank,
            **dict(sharded, wait_for_everyone=wait_for_everyone),
        )  # fmt: skip

    _as_processes(tiny, run)
    assert sorted(computed) == [100, 102, 103, 104]  # only what the killed run had not finished
    assert not list(tmp_path.glob("*/part*"))  # all merged into shards
    expected = {"z": encode_z(tiny, [p for p, _ in pictures]), "c": encode_c(tiny, [c for _, c in pictures])}
    for name in ("z", "c"):
        np.testing.assert_allclose(load_features(tmp_path, name, list(items)), expected[name].numpy(), atol=1e-3)


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


@pytest.fixture(scope="module")
def two_subjects(nsd_tree, tmp_path_factory):
    from brainldm.data.trials import prepare_subject

    out = tmp_path_factory.mktemp("trials")
    for subject in (1, 2):
        prepare_subject(nsd_tree.root, subject, out, sessions=1, progress=False, coco_annotations=nsd_tree.coco_archive)
    return out


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract_features", "scripts/extract_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_under_accelerate_share_extraction_and_reconstruction(
    nsd_tree, two_subjects, decoding_world, tmp_path
):
    """`extract_features.py` and `reconstruct.py` under `accelerate launch` with two processes (one launch for both,
    see tests/launch_scripts.py): the features equal one process's, and every trial is reconstructed exactly once."""
    import json
    import socket
    import subprocess
    import sys

    from brainldm.data.trials import SubjectStimuli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args = ["--data", str(two_subjects), "--subjects", "1,2", "--model", "tiny", "--features", "z,c"]
    args += ["--batch-size", "4"]
    decoding_world.maps.save_pretrained(tmp_path / "maps")
    reconstruct = [
        "scripts/reconstruct.py", "--maps", str(tmp_path / "maps"), "--data", str(decoding_world.data),
        "--subject", "1", "--trials", "0:7", "--steps", "2", "--output-size", "64", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
        "tests/launch_scripts.py", "scripts/extract_features.py", *args, "--out", str(tmp_path / "two"), "--",
        *reconstruct,
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    # the features: the same store as one process writes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun runs each process: the same float summation order
    try:
        _script().main([*args, "--out", str(tmp_path / "one")])  # one process, in this one
    finally:
        torch.set_num_threads(threads)
    ids = SubjectStimuli(two_subjects, [1, 2]).nsd_ids
    assert set(ids) == set(SubjectStimuli(two_subjects, 1).nsd_ids) | set(SubjectStimuli(two_subjects, 2).nsd_ids)
    one, two = _store_files(tmp_path / "one", ["z", "c"]), _store_files(tmp_path / "two", ["z", "c"])
    for name in ("z", "c"):
        assert [f[0] for f in one[name]] == [f[0] for f in two[name]]  # the same shards, after the merge
        for (_, ids_one, features_one), (_, ids_two, features_two) in zip(one[name], two[name]):
            assert ids_one.tolist() == ids_two.tolist()
            np.testing.assert_array_equal(features_one, features_two)
    assert sorted(np.concatenate([f[1] for f in two["z"]]).tolist()) == ids
    z = load_features(tmp_path / "two", "z", ids[:2])
    np.testing.assert_allclose(z, nsd_tree.features(ids[:2], "z"), atol=1e-4)
    assert load_features(tmp_path / "two", "c", ids).shape == (len(ids), 77, 32)

    # the reconstructions: each trial by one process
    subject = tmp_path / "out" / "subj01"
    per_process = [[int(line) for line in (subject / f"done.process{k}.txt").read_text().split()] for k in range(2)]
    assert all(per_process)  # both processes worked
    assert sorted(per_process[0] + per_process[1]) == list(range(7))  # every trial exactly once
    assert sorted(json.loads((f / "meta.json").read_text())["row"] for f in subject.glob("test-*")) == list(range(7))
    assert (subject / "contact_sheet.png").exists()


def test_a_second_subject_reuses_the_shared_pictures(two_subjects, tmp_path, capsys):
    from brainldm.data.trials import SubjectStimuli

    first, second = (set(SubjectStimuli(two_subjects, s).nsd_ids) for s in (1, 2))
    assert first & second and second - first  # shared pictures, and pictures of subject 2's own
    script = _script()
    base = ["--data", str(two_subjects), "--model", "tiny", "--features", "z", "--out", str(tmp_path)]
    script.main([*base, "--subject", "1"])
    assert f"z: {len(first)} images of subjects 1, 0 of them already in the store" in capsys.readouterr().out
    computed = []
    real = encode_z

    def counting(ldm, images, *args, **kwargs):
        computed.extend(images)
        return real(ldm, images, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("brainldm.ldm.extraction.encode_z", counting)
        script.main([*base, "--subject", "2"])
    assert len(computed) == len(second - first)  # counted, not timed: only subject 2's own pictures
    shared = len(first & second)
    assert f"z: {len(second)} images of subjects 2, {shared} of them already in the store" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        script.main([*base, "--subject", "1", "--features", "zc@7"])
    assert bad.value.code == 2 and "error: bad feature 'zc@7'" in capsys.readouterr().err
