"""Reconstruction: from decoded (z, c) to the paper's three images, Xz, Xc and Xzc.

``Reconstructor(ldm)(z, c)`` reads top to bottom as the method (Takagi & Nishimoto, CVPR 2023, sec. 3.3):

1. Xz: decode z with the VAE (a 320 px image for SD-1.x) and upsample it to the output size (512).
2. Xc: generate from c alone (text-to-image from pure noise), classifier-free guidance against "".
3. Xzc: img2img: re-encode Xz at 512, noise it to ``strength``, DDIM-denoise conditioned on c with guidance.

The follow-up pipeline of the paper's code adds two kinds (:class:`FollowUp`), from the decoded ``blip`` and ``dpt``
targets, when the maps carry them:

4. Xzt: Xzc's img2img from Xz, conditioned on the LDM's text embedding of the caption BLIP writes from the decoded
   image embedding (:mod:`brainldm.ldm.captioner`).
5. Xztd: Stable Diffusion 2 depth's img2img from Xz, prompted by that caption and conditioned on the depth map DPT
   draws from the decoded hidden states (:mod:`brainldm.ldm.depth`).

Steps 2 and 3 are diffusers' own pipelines (StableDiffusionPipeline / StableDiffusionImg2ImgPipeline) built on
the LDM's components, so the sampler is diffusers', not a re-implementation. Noise is seeded per image and sample
(:func:`noise_seed` of the seed, the image's key such as its ``nsd_id``, and the sample), so each image gets its own
noise, as the paper's code drew every image's from one seeded stream, and an image's reconstruction does not depend
on the batch it ran in. Without keys, sample k of every image is seeded ``seed + k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from brainldm.ldm.captioner import captioner_for, captions_from_embeddings
from brainldm.ldm.depth import depth_from_states, depth_img2img, load_depth_model
from brainldm.ldm.features import empty_prompt_embedding, encode_prompts
from brainldm.ldm.loading import DEPTH_MODEL, ldm_sizes, load_depth_ldm
from brainldm.presets import MAX_SAMPLES, TAKAGI2023, Sampling
from brainldm.torch_utils import noise_seed
from brainldm.validation import MAX_SEED, InputError, check_finite, check_sampling

MAX_BATCH = 8  # (image, sample) items per diffusion run: 16 U-Net rows with guidance, about 6 GB at 512 px in fp16
KINDS = ("Xz", "Xc", "Xzc", "Xzt", "Xztd")  # every kind of reconstruction, as trial folders name their images


@dataclass
class Reconstruction:
    """Images as uint8 arrays. Xz: (n, H, W, 3); Xc and Xzc: (n, num_samples, H, W, 3)."""

    Xz: np.ndarray
    Xc: np.ndarray
    Xzc: np.ndarray


class Reconstructor:
    """Turns predicted (z, c) into Xz, Xc and Xzc with a Stable Diffusion img2img pipeline's components."""

    def __init__(self, ldm, output_size: int | None = None, max_batch: int = MAX_BATCH):
        """``output_size`` defaults to the LDM's own (512 for SD-1.x, see :func:`brainldm.ldm.loading.ldm_sizes`).
        ``max_batch``: the most (image, sample) items in one diffusion run; more run one batch after another, with
        the same images (each item's noise is its own)."""
        if max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.img2img = ldm
        # the safety checker belongs to public text-to-image serving; reconstructions are research outputs
        components = dict(ldm.components, safety_checker=None, feature_extractor=None)
        self.txt2img = StableDiffusionPipeline(**components, requires_safety_checker=False)
        self.txt2img.set_progress_bar_config(disable=True)
        z_image_size, native_size = ldm_sizes(ldm)
        self.output_size = output_size or native_size
        self.z_image_size = z_image_size

    @property
    def device(self) -> torch.device:
        return self.img2img.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.img2img.unet.dtype

    def check_sampling(self, sampling: Sampling) -> None:
        """The settings alone, before any work: strength, steps (within the scheduler's), guidance, samples, seed."""
        strength, num_inference_steps, num_samples = (
            sampling.strength,
            sampling.num_inference_steps,
            sampling.num_samples,
        )
        if not 0 < strength <= 1:
            raise InputError(f"strength must be in (0, 1], got {strength}")
        check_sampling(self.img2img.scheduler, num_inference_steps, sampling.guidance_scale)
        if not 1 <= num_samples <= MAX_SAMPLES:
            raise InputError(f"samples must be in 1..{MAX_SAMPLES} per image (the paper drew 5), got {num_samples}")
        if not 0 <= sampling.seed <= MAX_SEED - (num_samples - 1):
            raise InputError(f"seed must be in 0..2^64-{num_samples} (sample k uses seed + k), got {sampling.seed}")
        if int(num_inference_steps * strength) < 1:
            raise InputError(
                f"strength {strength} x {num_inference_steps} steps runs no denoising step; raise either of them"
            )

    def check_inputs(self, z, c, sampling: Sampling) -> None:
        vae, unet = self.img2img.vae, self.img2img.unet
        if z.ndim != 4 or z.shape[1] != vae.config.latent_channels:
            raise InputError(
                f"z must be (n, {vae.config.latent_channels}, h, w) for this LDM, got {tuple(z.shape)}; "
                "were the maps fitted for another model?"
            )
        expected_c = (self.img2img.tokenizer.model_max_length, unet.config.cross_attention_dim)
        if c.ndim != 3 or tuple(c.shape[1:]) != expected_c:
            raise InputError(
                f"c must be (n, {expected_c[0]}, {expected_c[1]}) for this LDM, got {tuple(c.shape)}; "
                "were the maps fitted for another model?"
            )
        if len(z) != len(c):
            raise InputError(f"z and c hold different numbers of items ({len(z)} and {len(c)})")
        self.check_sampling(sampling)
        check_finite("z", z)
        check_finite("c", c)

    @torch.no_grad()
    def decode_z(self, z: torch.Tensor) -> torch.Tensor:
        """Xz as a tensor in [-1, 1]: the VAE decode of z, upsampled to the output size -> (n, 3, size, size)."""
        vae = self.img2img.vae
        image = vae.decode(z.to(self.device, self.dtype) / vae.config.scaling_factor).sample
        if image.shape[-1] != self.output_size:
            image = F.interpolate(image.float(), size=self.output_size, mode="bicubic", align_corners=False)
        return image.clamp(-1, 1)

    def in_batches(self, n_items: int, run) -> np.ndarray:
        """``run(items)`` (a slice of the n items -> their images) over batches of at most ``max_batch`` items."""
        return np.concatenate([run(slice(i, i + self.max_batch)) for i in range(0, n_items, self.max_batch)])

    @torch.no_grad()
    def __call__(
        self,
        z: torch.Tensor,
        c: torch.Tensor,
        sampling: Sampling = TAKAGI2023.sampling,
        include_xc: bool = True,
        keys: Sequence[int] | None = None,
        include_xzc: bool = True,
    ) -> Reconstruction:
        """Reconstruct n images from z (n, 4, h, w) and c (n, 77, hidden) with the ``sampling`` settings.

        Returns Xz once per image and ``sampling.num_samples`` of Xc and Xzc. ``include_xc=False`` skips Xc (a
        full-length generation) when only Xzc is wanted, ``include_xzc=False`` Xzc when only Xc is; the one skipped is
        returned empty. ``keys`` (n,): what tells the images apart (their ``nsd_id``), so that each gets its own noise
        (:func:`noise_seed`); without them every image's sample k starts from the same noise (seeded ``seed + k``).
        """
        z, c = torch.as_tensor(z), torch.as_tensor(c)
        self.check_inputs(z, c, sampling)
        n, num_samples = len(z), sampling.num_samples
        if keys is not None and len(keys) != n:
            raise InputError(f"keys must name each of the {n} images, got {len(keys)}")
        seeds = sample_seeds(sampling, n, keys)

        # 1. Xz
        xz = self.decode_z(z)

        # every (image, sample) pair is one item of the diffusion batch; its noise depends on it alone
        xz_items = ((xz + 1) / 2).repeat_interleave(num_samples, dim=0).to(self.dtype)  # diffusers wants [0, 1]
        c_items = c.to(self.device, self.dtype).repeat_interleave(num_samples, dim=0)
        uncond = empty_prompt_embedding(self.img2img).to(self.device, self.dtype).expand(len(c_items), -1, -1)

        def conditioned_on_c(items: slice) -> dict:
            """What both pipelines get for some items: c with classifier-free guidance, the steps, and fresh seeded
            generators."""
            return dict(
                prompt_embeds=c_items[items],
                negative_prompt_embeds=uncond[items],
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                generator=[torch.Generator().manual_seed(k) for k in seeds[items]],
                output_type="np",
            )

        size = self.output_size
        skipped = np.zeros((0, size, size, 3), dtype=np.float32)

        # 2. Xc: text-to-image from c alone
        xc = skipped
        if include_xc:
            shape = dict(height=size, width=size)
            xc = self.in_batches(len(seeds), lambda items: self.txt2img(**shape, **conditioned_on_c(items)).images)

        # 3. Xzc: img2img from Xz, conditioned on c
        xzc = skipped
        if include_xzc:
            xzc = self.in_batches(
                len(seeds),
                lambda items: (
                    self.img2img(image=xz_items[items], strength=sampling.strength, **conditioned_on_c(items)).images
                ),
            )

        return Reconstruction(
            Xz=to_uint8((xz.float().permute(0, 2, 3, 1).cpu().numpy() + 1) / 2),
            Xc=to_uint8(xc).reshape(-1, num_samples, size, size, 3),  # (n or 0 images, samples, ...)
            Xzc=to_uint8(xzc).reshape(-1, num_samples, size, size, 3),
        )


@dataclass
class FollowUp:
    """The follow-up pipeline's models: the BLIP captioner (:func:`brainldm.ldm.captioner.load_captioner`), and for
    Xztd the DPT depth model (:func:`brainldm.ldm.depth.load_depth_model`) and Stable Diffusion 2 depth
    (:func:`brainldm.ldm.loading.load_depth_ldm`). ``ids``: their model ids, recorded with the trials they make."""

    captioner: object
    depth_model: object | None = None
    depth_ldm: object | None = None
    ids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if (self.depth_model is None) != (self.depth_ldm is None):
            raise InputError("Xztd needs both a depth model (DPT) and a depth LDM (Stable Diffusion 2 depth)")

    @classmethod
    def for_maps(
        cls,
        maps,
        captioner: str | None = None,
        depth_model: str | None = None,
        depth_ldm: str | None = None,
        device=None,
    ) -> FollowUp:
        """The models for maps that decode ``blip`` (and ``dpt``): the captioner and depth model the maps were fitted
        to unless others are named, at the image size the embeddings were taken at, and Stable Diffusion 2 depth
        (``stabilityai/stable-diffusion-2-depth`` unless another is named) where the maps decode ``dpt``."""

        targets = maps.config.targets
        if "blip" not in targets:
            raise InputError(f"subject {maps.subject}'s maps do not decode blip, so no caption can be written")
        ids = {"captioner": captioner or targets["blip"].model_id}
        loaded = captioner_for(targets["blip"], captioner, device)
        if "dpt" not in targets:
            return cls(loaded, ids=ids)

        ids["depth_model"] = depth_model or targets["dpt"].model_id
        ids["depth_ldm"] = depth_ldm or DEPTH_MODEL
        return cls(loaded, load_depth_model(ids["depth_model"], device), load_depth_ldm(ids["depth_ldm"], device), ids)

    @torch.no_grad()
    def __call__(
        self,
        reconstructor: Reconstructor,
        z: torch.Tensor,
        decoded: dict[str, torch.Tensor],
        sampling: Sampling = TAKAGI2023.sampling,
        keys: Sequence[int] | None = None,
    ) -> dict:
        """From decoded z, ``blip`` and (for Xztd) ``dpt`` of n images -> {"captions": n strings, "Xzt": (n,
        num_samples, H, W, 3) uint8, and with a depth model "depth": (n, h, w) float32 and "Xztd" like Xzt}. Sample k
        of an image starts from the noise of its Xzc's sample k."""

        captions = captions_from_embeddings(self.captioner, decoded["blip"])
        c = encode_prompts(reconstructor.img2img, captions)
        out = {"captions": captions, "Xzt": reconstructor(z, c, sampling, include_xc=False, keys=keys).Xzc}
        if self.depth_model is None or "dpt" not in decoded:
            return out

        n, num_samples = len(z), sampling.num_samples
        depth = depth_from_states(self.depth_model, decoded["dpt"])
        seeds = sample_seeds(sampling, n, keys)
        init = ((reconstructor.decode_z(z).float() + 1) / 2).repeat_interleave(num_samples, dim=0)
        prompts = [caption for caption in captions for _ in range(num_samples)]
        depth_items = depth.repeat_interleave(num_samples, dim=0)
        images = reconstructor.in_batches(
            len(seeds),
            lambda items: depth_img2img(
                self.depth_ldm, init[items], prompts[items], depth_items[items], sampling, seeds[items]
            ),
        )
        size = reconstructor.output_size
        out["depth"] = depth.numpy()
        out["Xztd"] = to_uint8(images).reshape(n, num_samples, size, size, 3)
        return out


def sample_seeds(sampling: Sampling, n: int, keys: Sequence[int] | None = None) -> list[int]:
    """The seed of every (image, sample) item, image-major: :func:`noise_seed` of each key, or ``seed + k``."""
    return [
        sampling.seed + s if keys is None else noise_seed(sampling.seed, int(keys[i]), s)
        for i in range(n)
        for s in range(sampling.num_samples)
    ]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8."""
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)
