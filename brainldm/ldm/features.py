"""LDM features of a picture: z (VAE latents of the image) and c (CLIP text embeddings of its captions), and the
hooked img2img run that gives zc (the noisy latent at a strength) and the U-Net's layers.

All functions take the LDM (a diffusers Stable Diffusion pipeline, see :mod:`brainldm.ldm.loading`) and read shapes
from it, so SD-1.x (z 4x40x40, c 77x768), SD-2.x and smaller models go through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from brainldm.data.features import FeatureSpec, check_step
from brainldm.images import ImageLike, images_to_tensor
from brainldm.ldm.loading import ldm_sizes
from brainldm.presets import TAKAGI2023
from brainldm.torch_utils import noise_seed
from brainldm.validation import InputError


@torch.no_grad()
def encode_z(ldm, images: Sequence[ImageLike], image_size: int | None = None) -> torch.Tensor:
    """z: the VAE latent mean of each image at ``image_size``, times the VAE scaling factor.

    ``image_size`` defaults to the LDM's z size (320 for SD-1.x, see :func:`brainldm.ldm.loading.ldm_sizes`).

    Returns a float32 CPU tensor (n, latent_channels, image_size / 8, image_size / 8): (n, 4, 40, 40) for SD-1.x.
    """

    vae = ldm.vae
    x = images_to_tensor(images, image_size or ldm_sizes(ldm)[0]).to(device=vae.device, dtype=vae.dtype)
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return z.float().cpu()


@torch.no_grad()
def encode_prompts(ldm, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP text-encoder last hidden states, each prompt padded to the tokenizer's length -> (n, 77, hidden)."""
    tokenizer, text_encoder = ldm.tokenizer, ldm.text_encoder
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float().cpu()


def encode_c(ldm, captions: Sequence[Sequence[str]]) -> torch.Tensor:
    """c: for each image, the mean over its captions of :func:`encode_prompts` -> (n_images, 77, hidden)."""
    for i, caps in enumerate(captions):
        if isinstance(caps, str) or len(caps) == 0:
            raise InputError(f"image {i} has no captions (expected a non-empty list of strings, got {caps!r})")
    flat = [cap for caps in captions for cap in caps]
    embeddings = encode_prompts(ldm, flat)
    sizes = [len(caps) for caps in captions]
    return torch.stack([chunk.mean(0) for chunk in embeddings.split(sizes)])


def reduce_tap(hidden: torch.Tensor, reduction: str) -> torch.Tensor:
    """A U-Net tap (n, C, H, W) reduced as :data:`REDUCTIONS` says -> (n, d) float32."""
    hidden = hidden.float()
    if reduction == "mean":
        return hidden.mean(dim=(2, 3))
    if reduction.startswith("pool"):
        return torch.nn.functional.adaptive_avg_pool2d(hidden, int(reduction[4:])).flatten(1)
    return hidden.flatten(1)


# --- zc and U-Net taps: one img2img run per strength ---------------------------------------------------------


def image_generators(nsd_ids: Sequence[int], seed: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded as the reconstructions' first sample
    (:func:`~brainldm.torch_utils.noise_seed`
    of the seed and the ``nsd_id``): the noise of an image does not depend on its batch."""
    return [torch.Generator().manual_seed(noise_seed(seed, int(i))) for i in nsd_ids]


@torch.no_grad()
def empty_prompt_embedding(ldm) -> torch.Tensor:
    """The text embedding of "" (1, 77, hidden): classifier-free guidance's unconditional branch."""
    return encode_prompts(ldm, [""])


@torch.no_grad()
def img2img_latents(
    ldm,
    z: torch.Tensor,
    c: torch.Tensor,
    nsd_ids: Sequence[int],
    strength: float,
    num_inference_steps: int = TAKAGI2023.sampling.num_inference_steps,
    guidance_scale: float = TAKAGI2023.sampling.guidance_scale,
    seed: int = TAKAGI2023.sampling.seed,
    taps: Sequence[FeatureSpec] = (),
    unet_reduce: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run diffusers' img2img from latents z (n, 4, h, w) conditioned on c (n, 77, hidden).

    Returns the final latents zc (n, 4, h, w) and, for each U-Net tap spec, its activations (n, ...), float32 CPU.
    """
    device, dtype = ldm.unet.device, ldm.unet.dtype
    for spec in taps:
        check_step(spec, num_inference_steps)
    recorded: dict[str, torch.Tensor] = {}
    step = {"k": 0}
    hooks = []
    by_block: dict[str, dict[int, str]] = {}
    for spec in taps:
        by_block.setdefault(spec.block, {})[spec.step] = spec.name

    def block_module(block: str):
        if block == "mid":
            return ldm.unet.mid_block
        blocks = getattr(ldm.unet, f"{block[:-1]}_blocks")
        if int(block[-1]) >= len(blocks):
            raise InputError(f"unet.{block}: this U-Net has {len(blocks)} {block[:-1]} blocks (0..{len(blocks) - 1})")
        return blocks[int(block[-1])]

    for block, wanted in by_block.items():

        def hook(module, args, output, wanted=wanted):
            if step["k"] in wanted:
                hidden = output[0] if isinstance(output, tuple) else output
                hidden = hidden.chunk(2)[1] if guidance_scale > 1 else hidden  # the conditional branch
                recorded[wanted[step["k"]]] = reduce_tap(hidden, unet_reduce).cpu()

        hooks.append(block_module(block).register_forward_hook(hook))
    hooks.append(ldm.unet.register_forward_pre_hook(lambda module, args: step.__setitem__("k", step["k"] + 1)))
    try:
        latents = ldm(
            image=z.to(device=device, dtype=dtype),
            prompt_embeds=c.to(device=device, dtype=dtype),
            negative_prompt_embeds=empty_prompt_embedding(ldm).expand(len(c), -1, -1).to(device=device, dtype=dtype),
            strength=strength,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=image_generators(nsd_ids, seed),
            output_type="latent",
        ).images
    finally:
        for h in hooks:
            h.remove()
    return latents.float().cpu(), recorded
