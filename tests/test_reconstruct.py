"""Reconstructor and test-set runs: shapes, seeds, strength, conditioning, batching, resume, sharding, errors."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from brainldm.data.features import steps_run
from brainldm.ldm.features import encode_prompts
from brainldm.ldm.reconstruct import Reconstructor
from brainldm.presets import Sampling
from brainldm.reconstruction.job import reconstruct_trials
from brainldm.validation import InputError

FAST = Sampling(num_inference_steps=5, guidance_scale=5.0)


def fast(**changes) -> Sampling:
    return replace(FAST, **changes)


@pytest.fixture(scope="module")
def reconstructor(tiny):
    return Reconstructor(tiny, output_size=64)


@pytest.fixture(scope="module")
def zc():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 40, 40, generator=g), torch.randn(3, 77, 32, generator=g)


def test_outputs_have_the_documented_shapes(reconstructor, zc):
    out = reconstructor(*zc, fast(num_samples=2))
    assert out.Xz.shape == (3, 64, 64, 3) and out.Xz.dtype == np.uint8
    assert out.Xc.shape == out.Xzc.shape == (3, 2, 64, 64, 3)


def test_the_same_seed_gives_the_same_images_and_another_seed_does_not(reconstructor, zc):
    a = reconstructor(*zc, fast(seed=3))
    b = reconstructor(*zc, fast(seed=3))
    c = reconstructor(*zc, fast(seed=4))
    np.testing.assert_array_equal(a.Xzc, b.Xzc)
    np.testing.assert_array_equal(a.Xc, b.Xc)
    assert not np.array_equal(a.Xzc, c.Xzc)
    np.testing.assert_array_equal(a.Xz, c.Xz)  # Xz is a plain decode: no noise
    # Xc or Xzc alone, when only one is wanted: the same images, the other left empty
    xc_only, xzc_only = (reconstructor(*zc, fast(seed=3), **{f"include_{k}": False}) for k in ("xzc", "xc"))
    np.testing.assert_array_equal(xc_only.Xc, a.Xc)
    np.testing.assert_array_equal(xzc_only.Xzc, a.Xzc)
    assert xc_only.Xzc.shape[0] == xzc_only.Xc.shape[0] == 0


@pytest.mark.parametrize("strength, steps", [(0.8, 10), (0.3, 10), (1.0, 4)])
def test_strength_sets_the_number_of_denoising_steps(reconstructor, zc, strength, steps):
    calls = []
    hook = reconstructor.img2img.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        reconstructor(*zc, fast(strength=strength, num_inference_steps=steps), include_xc=False)
    finally:
        hook.remove()
    assert len(calls) == steps_run(steps, strength) == min(int(steps * strength), steps)


def test_guidance_is_against_the_empty_prompt(reconstructor, tiny, zc):
    """c equal to the embedding of "" leaves guidance nothing to push toward: guidance 5 gives the images of 1.
    Guiding against any other embedding (zeros, a padded c) would not."""
    empty = encode_prompts(tiny, ["", ""])
    guided = reconstructor(zc[0][:2], empty, fast(guidance_scale=5.0))
    plain = reconstructor(zc[0][:2], empty, fast(guidance_scale=1.0))
    for name in ("Xc", "Xzc"):
        difference = getattr(guided, name).astype(int) - getattr(plain, name)
        assert np.abs(difference).max() <= 2, name


def test_xzc_differs_from_xz_and_depends_on_c(reconstructor, zc):
    z, c = zc
    out = reconstructor(z, c, FAST)
    other = reconstructor(z, torch.roll(c, 1, dims=0), FAST)
    assert np.abs(out.Xzc[:, 0].astype(int) - out.Xz).mean() > 5
    assert not np.array_equal(out.Xzc, other.Xzc)
    np.testing.assert_array_equal(out.Xz, other.Xz)


def test_speed_ups_keep_the_results(zc):
    from brainldm.ldm.loading import optimize_ldm
    from brainldm.offline.twins import tiny_ldm

    plain = Reconstructor(tiny_ldm(), output_size=64)(*zc, FAST)
    fused = Reconstructor(optimize_ldm(tiny_ldm(), channels_last=True), output_size=64)(*zc, FAST)
    for name in ("Xz", "Xc", "Xzc"):
        assert np.abs(getattr(plain, name).astype(int) - getattr(fused, name)).max() <= 2, name


def test_a_batch_equals_its_items_run_one_by_one(reconstructor, zc):
    z, c = zc
    batch = reconstructor(z, c, fast(num_samples=2))
    for i in range(len(z)):
        alone = reconstructor(z[i : i + 1], c[i : i + 1], fast(num_samples=2))
        for name in ("Xz", "Xc", "Xzc"):
            difference = np.abs(getattr(batch, name)[i].astype(int) - getattr(alone, name)[0]).max()
            assert difference <= 2, name  # uint8 rounding of float summation-order differences only


def test_diffusion_runs_in_batches_of_at_most_max_batch_items_with_the_same_images(tiny, zc):
    # 3 images x 2 samples = 6 items: one run of 6 by default, runs of at most 4 with max_batch=4
    sizes = []
    bounded = Reconstructor(tiny, output_size=64, max_batch=4)
    real = bounded.img2img.__class__.__call__

    def counting(pipe, *args, **kwargs):
        sizes.append(len(kwargs["prompt_embeds"]))
        return real(pipe, *args, **kwargs)

    keys = [11, 12, 13]
    whole = Reconstructor(tiny, output_size=64)(*zc, fast(num_samples=2), keys=keys)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bounded.img2img.__class__, "__call__", counting)
        parts = bounded(*zc, fast(num_samples=2), keys=keys)
    assert sizes == [4, 2]
    for name in ("Xz", "Xc", "Xzc"):
        assert np.abs(getattr(parts, name).astype(int) - getattr(whole, name)).max() <= 2, name


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(z=torch.zeros(1, 3, 40, 40)), "z must be \\(n, 4, h, w\\)"),
        (dict(c=torch.zeros(1, 77, 768)), "c must be \\(n, 77, 32\\).*another model"),
        (dict(strength=0.0), "strength must be in \\(0, 1\\]"),
        (dict(strength=1.5), "strength must be in \\(0, 1\\]"),
        (dict(num_inference_steps=0), "steps must be in 1\\.\\.1000"),
        (dict(num_inference_steps=5000), "steps must be in 1\\.\\.1000 \\(the scheduler's training steps\\)"),
        (dict(guidance_scale=0.5), "guidance must be >= 1"),
        (dict(seed=2**70), "seed must be in 0\\.\\.2\\^64"),
        (dict(seed=-1), "seed must be in 0\\.\\.2\\^64"),
        (dict(z=torch.full((1, 4, 40, 40), float("nan"))), "z contains"),
        (dict(c=torch.full((1, 77, 32), float("nan"))), "c contains"),
    ],
)
def test_bad_inputs_raise_clear_errors(reconstructor, change, match):
    args = dict(z=torch.zeros(1, 4, 40, 40), c=torch.zeros(1, 77, 32), strength=0.8, num_inference_steps=5)
    args.update(change)
    z, c = args.pop("z"), args.pop("c")
    with pytest.raises(InputError, match=match):
        reconstructor(z, c, Sampling(**args))


# --- test-set runs --------------------------------------------------------------------------------------------


def test_trials_are_written_and_a_rerun_skips_finished_ones(decoding_world, reconstructor, tmp_path, monkeypatch):
    maps, data = decoding_world.maps, decoding_world.data
    folders = reconstruct_trials(reconstructor, maps, data, 1, tmp_path, rows=[0, 3], progress=False, sampling=FAST)
    for folder in folders:
        names = {"original.png", "Xz.png", "Xc_0.png", "Xzc_0.png", "z.npy", "c.npy", "meta.json"}
        assert {p.name for p in folder.iterdir()} == names
    meta = json.loads((folders[1] / "meta.json").read_text())
    assert meta["row"] == 3 and meta["split"] == "test" and meta["num_inference_steps"] == 5

    shutil.rmtree(folders[0])  # as if killed before trial 0 finished
    done = []
    real_call = Reconstructor.__call__
    monkeypatch.setattr(Reconstructor, "__call__", lambda self, z, c, *a, **k: done.append(len(z)) or real_call(
        self, z, c, *a, **k))  # fmt: skip
    reconstruct_trials(reconstructor, maps, data, 1, tmp_path, rows=[0, 3], progress=False, sampling=FAST)
    assert done == [1]  # only trial 0 again


def test_out_of_range_trials_and_maps_of_another_subject_are_refused(decoding_world, reconstructor, tmp_path):
    with pytest.raises(InputError, match="trial 99 is out of range"):
        reconstruct_trials(
            reconstructor, decoding_world.maps, decoding_world.data, 1, tmp_path, rows=[99], sampling=FAST
        )
    with pytest.raises(InputError, match="fitted on subject 1's voxel table"):
        reconstruct_trials(
            reconstructor, decoding_world.maps, decoding_world.data, 2, tmp_path, rows=[0], sampling=FAST
        )


def test_each_image_gets_its_own_noise_by_its_key_whatever_its_batch(reconstructor, zc):
    """With keys (nsd_ids), the same z and c under two keys start from different noise, while an image's result
    does not depend on the batch it ran in (as without keys)."""
    z, c = zc[0][:1].repeat(2, 1, 1, 1), zc[1][:1].repeat(2, 1, 1)
    twins = reconstructor(z, c, FAST, keys=[7, 7])
    pair = reconstructor(z, c, FAST, keys=[7, 8])

    def differ(a, b) -> int:
        return int(np.abs(a.astype(int) - b).max())

    assert differ(twins.Xc[0], twins.Xc[1]) <= 2 and differ(pair.Xc[0], pair.Xc[1]) > 20
    alone = reconstructor(z[1:], c[1:], FAST, keys=[8])
    assert differ(alone.Xc[0], pair.Xc[1]) <= 2 and differ(alone.Xzc[0], pair.Xzc[1]) <= 2
    with pytest.raises(InputError, match="keys must name each of the 2 images"):
        reconstructor(z, c, FAST, keys=[1])
