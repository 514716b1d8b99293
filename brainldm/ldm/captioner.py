"""Decoded captions: BLIP's image embeddings as a decoding target, and captions written from decoded ones.

Takagi & Nishimoto's follow-up code (yu-takagi/StableDiffusionReconstruction, ``codes/caption/BLIP``) decodes every
token of BLIP's ViT-B image embedding (768 wide) from the voxels of six streams together, then lets BLIP's text
decoder write a caption from the decoded embedding (beam search, 3 beams, 5 to 20 tokens, repetition penalty 1.5,
after the prompt "a picture of "); the LDM's text encoder then embeds that caption as c.

Here the captioner is transformers' :class:`~transformers.BlipForConditionalGeneration` with its tokenizer
(:class:`Captioner`): ``load_captioner(model_id)`` for a Hub checkpoint or a name in :mod:`brainldm.ldm.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from brainldm.images import PREPROCESSING, images_to_tensor
from brainldm.ldm import registry
from brainldm.torch_utils import default_device
from brainldm.validation import InputError

BLIP_MODEL = "Salesforce/blip-image-captioning-base"  # transformers' port of BLIP's ViT-B captioner
BLIP_IMAGE_SIZE = 240  # the reference code's (its BLIP decoder was built at 240 px: 226 tokens x 768)
MAX_IMAGE_SIZE = 1024  # px: 4,097 tokens for ViT-B, 18 x the reference code's 226


@dataclass(frozen=True)
class CaptionSettings:
    """How a caption is written from image embeddings: the reference code's beam search."""

    prompt: str = "a picture of "
    num_beams: int = 3
    min_length: int = 5
    max_length: int = 20
    repetition_penalty: float = 1.5


TAKAGI_CAPTIONS = CaptionSettings()


@dataclass
class Captioner:
    """A BLIP captioning model, its tokenizer, and the image size its embeddings are taken at."""

    model: torch.nn.Module  # BlipForConditionalGeneration
    tokenizer: object
    image_size: int = BLIP_IMAGE_SIZE

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embedding_shape(self) -> tuple[int, int]:
        """(tokens, width) of one image's embedding at ``image_size``: (226, 768) for ViT-B at 240 px."""
        vision = self.model.config.vision_config
        return ((self.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size)


def load_captioner(model_id: str = BLIP_MODEL, device=None, image_size: int = BLIP_IMAGE_SIZE) -> Captioner:
    """A Hub BLIP captioner (or a local folder, or a name registered in :mod:`brainldm.ldm.registry`), in eval mode
    on ``device``, taking its embeddings at ``image_size`` (position embeddings interpolated where that is not the
    model's own)."""

    entry = registry.builder("captioner", model_id)
    if entry is not None:
        captioner = entry.build()
        captioner.image_size = image_size
    else:
        from transformers import AutoTokenizer, BlipForConditionalGeneration

        try:
            model = BlipForConditionalGeneration.from_pretrained(model_id)
            tokenizer = AutoTokenizer.from_pretrained(model_id)
        except OSError as err:
            raise InputError(
                f"could not load the BLIP captioner {model_id!r}: {err}; pass a Hub id or local folder of a "
                f"BlipForConditionalGeneration checkpoint{registry.alternatives('captioner')}"
            ) from err
        captioner = Captioner(model, tokenizer, image_size)
    check_image_size(captioner.model, image_size)
    captioner.model.eval().to(default_device(device))
    return captioner


def check_image_size(model, image_size: int) -> None:
    """Refuse an image size BLIP's vision tower cannot take: not a whole number of its patches (16 px for ViT-B), or
    past :data:`MAX_IMAGE_SIZE` (its tokens, and memory, grow with the square of the size)."""
    patch = model.config.vision_config.patch_size
    if not (isinstance(image_size, int) and patch <= image_size <= MAX_IMAGE_SIZE and image_size % patch == 0):
        raise InputError(
            f"--blip-image-size must be a multiple of the captioner's {patch}-px patch from {patch} to {MAX_IMAGE_SIZE}"
            f" px, got {image_size!r}; the reference code's is {BLIP_IMAGE_SIZE}"
        )


def captioner_for(target, model_id: str | None = None, device=None) -> Captioner:
    """The captioner a decoded ``blip`` target (a :class:`~brainldm.decoding.maps.TargetConfig`) was fitted to, or the
    one ``model_id`` names, taking embeddings at the image size of the target's (its token count is (size / patch)^2 +
    1)."""
    captioner = load_captioner(model_id or target.model_id, device=device)
    captioner.image_size = math.isqrt(target.shape[0] - 1) * captioner.model.config.vision_config.patch_size
    if tuple(target.shape) != captioner.embedding_shape:
        raise InputError(
            f"the maps decode BLIP embeddings of shape {tuple(target.shape)}, which captioner "
            f"{model_id or target.model_id!r} does not make; use the captioner the maps were fitted to"
        )
    return captioner


def pixel_values(images, size: int) -> torch.Tensor:
    """Images -> (n, 3, size, size) in [0, 1], as the reference code feeds BLIP (``PREPROCESSING["blip"]``)."""
    return images_to_tensor(images, size, "unit")


@torch.no_grad()
def blip_embeddings(captioner: Captioner, images) -> torch.Tensor:
    """The ``blip`` target: BLIP's image embedding of each image, every token -> (n, tokens, width) float32 CPU."""
    model = captioner.model
    x = pixel_values(images, captioner.image_size).to(captioner.device, model.dtype)
    interpolate = captioner.image_size != model.config.vision_config.image_size
    return model.vision_model(pixel_values=x, interpolate_pos_encoding=interpolate)[0].float().cpu()


def blip_feature(captioner: Captioner, model_id: str) -> tuple[dict, Callable]:
    """The ``blip`` feature for :func:`brainldm.ldm.extraction.extract_features`: what its store records (the
    captioner's id, the image size), and the function of a batch of images that computes it."""
    recorded = {"model_id": model_id, "image_size": captioner.image_size, "preprocessing": PREPROCESSING["blip"]}
    return recorded, lambda images: blip_embeddings(captioner, images)


@torch.no_grad()
def captions_from_embeddings(
    captioner: Captioner, embeddings: torch.Tensor, settings: CaptionSettings = TAKAGI_CAPTIONS
) -> list[str]:
    """A caption for each image embedding (n, tokens, width), true or decoded: BLIP's text decoder, attending to the
    embedding, continues ``settings.prompt`` by beam search. Returns the captions without the prompt."""
    model, tokenizer = captioner.model, captioner.tokenizer
    embeddings = torch.as_tensor(embeddings)
    if embeddings.ndim != 3 or tuple(embeddings.shape[1:]) != captioner.embedding_shape:
        raise InputError(
            f"BLIP embeddings must be (n, {captioner.embedding_shape[0]}, {captioner.embedding_shape[1]}) for this "
            f"captioner at {captioner.image_size} px, got {tuple(embeddings.shape)}; were the maps fitted to another "
            "captioner's features?"
        )
    embeddings = embeddings.to(captioner.device, model.dtype)
    text = model.config.text_config
    prompt = tokenizer([settings.prompt] * len(embeddings), return_tensors="pt").input_ids.to(captioner.device)
    prompt[:, 0] = text.bos_token_id
    out = model.text_decoder.generate(
        input_ids=prompt[:, :-1],  # [DEC] and the prompt, without its closing [SEP]
        encoder_hidden_states=embeddings,
        encoder_attention_mask=torch.ones(embeddings.shape[:2], dtype=torch.long, device=embeddings.device),
        eos_token_id=text.sep_token_id,
        pad_token_id=text.pad_token_id,
        num_beams=settings.num_beams,
        min_length=settings.min_length,
        max_length=settings.max_length,
        repetition_penalty=settings.repetition_penalty,
        do_sample=False,
    )
    return strip_prompt(tokenizer, out, settings.prompt)


def strip_prompt(tokenizer, token_ids: torch.Tensor, prompt: str) -> list[str]:
    """Generated token ids (n, length) -> their texts without the prompt they began with."""
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    said = tokenizer.decode(tokenizer(prompt).input_ids, skip_special_tokens=True)  # the prompt as decoding writes it
    return [t[len(said) :].strip() if t.startswith(said) else t.strip() for t in texts]
