"""tiny_ldm is a Stable-Diffusion-shaped, seeded, offline model; load_ldm fails clearly offline."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from brainldm.ldm.loading import load_ldm
from brainldm.offline.twins import ddim_scheduler, tiny_ldm
from brainldm.presets import TAKAGI2023
from brainldm.validation import InputError


def test_tiny_ldm_runs_a_64px_img2img_on_cpu(tiny):
    image = torch.rand(1, 3, 64, 64)

    def run():
        return tiny(
            prompt="a red circle",
            image=image,
            strength=0.8,
            num_inference_steps=10,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    out = run()
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, run())


def test_tiny_ldm_has_stable_diffusion_geometry(tiny):
    assert isinstance(tiny.scheduler, DDIMScheduler)
    assert tiny.vae.config.scaling_factor == TAKAGI2023.vae_scaling_factor
    assert tiny.tokenizer.model_max_length == 77
    with torch.no_grad():
        z = tiny.vae.encode(torch.zeros(1, 3, 320, 320)).latent_dist.mean
        ids = tiny.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        c = tiny.text_encoder(ids)[0]
    assert z.shape == (1, 4, 40, 40)
    assert c.shape == (1, 77, tiny.unet.config.cross_attention_dim)


@pytest.mark.parametrize("shift", [1.0, 4.0])
def test_ddim_scheduler_shift_multiplies_every_signal_to_noise_ratio(shift):
    sd = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    shifted = ddim_scheduler(shift)
    assert (shifted.config.trained_betas is None) == (shift == 1.0)  # SD's own schedule stays SD's config
    snr = [a / (1 - a) for a in (shifted.alphas_cumprod.double(), sd.alphas_cumprod.double())]
    torch.testing.assert_close(snr[0] / snr[1], torch.full_like(snr[0], shift), rtol=1e-3, atol=0)


def test_tiny_ldm_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = tiny_ldm(seed=0), tiny_ldm(seed=0), tiny_ldm(seed=1)
    assert torch.equal(torch.rand(1), expected)
    wa, wb, wc = (p.unet.conv_in.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_load_ldm_tiny_is_fp32_on_cpu():
    pipe = load_ldm("tiny", device="cpu")
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"


def test_load_ldm_offline_and_not_cached_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        InputError, match="--model 'someone/not-a-cached-model' is not in the Hugging Face cache.*OFFLINE"
    ):
        load_ldm("someone/not-a-cached-model", device="cpu")


def test_random_twins_have_the_real_models_architectures():
    """The rehearsal's models (seeded random weights, built without any download) at the sizes of the checkpoints a
    real run loads: shapes and parameter counts, built on the meta device (no memory, no compute)."""
    from brainldm.ldm.depth import states_shape
    from brainldm.ldm.loading import ldm_sizes
    from brainldm.offline.twins import (
        random_blip_captioner,
        random_clip_l14,
        random_dpt_large,
        random_sd2_depth_ldm,
        random_sd14_ldm,
    )

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        sd14, depth = random_sd14_ldm(), random_sd2_depth_ldm()
        captioner, dpt = random_blip_captioner(), random_dpt_large()
        clip = random_clip_l14()
    assert count(sd14.unet) == 859_520_964 and count(sd14.text_encoder) == 123_060_480  # SD-1.4's
    assert ldm_sizes(sd14) == (320, 512) and sd14.unet.config.cross_attention_dim == 768  # z 4 x 40 x 40, c 77 x 768
    assert depth.unet.config.in_channels == 5 and depth.unet.config.cross_attention_dim == 1024
    assert count(depth.unet) == 865_913_604 and count(depth.text_encoder) == 340_387_840  # SD-2-depth's, OpenCLIP-H's
    assert captioner.embedding_shape == (226, 768) and count(captioner.model) > 220e6  # BLIP ViT-B at 240 px
    assert states_shape(dpt) == (4, 577, 1024) and 340e6 < count(dpt) < 345e6  # DPT-large at 384 px
    assert clip.config.projection_dim == 768 and 300e6 < count(clip) < 306e6  # CLIP ViT-L/14's vision tower
