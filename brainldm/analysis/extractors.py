"""The feature metrics' networks, loaded lazily through their usual loaders (torchvision and torch.hub for the CNNs,
transformers for CLIP): each an :data:`Extractor`, images in, features out. A metric whose network cannot be loaded is
refused up front, or reported as unavailable with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from brainldm.analysis.protocol import METRICS
from brainldm.images import normalise
from brainldm.ldm import registry
from brainldm.metrics import as_evaluated
from brainldm.validation import InputError

Extractor = Callable[[list[np.ndarray]], np.ndarray]
CLIP_MODEL = "openai/clip-vit-large-patch14"


def _batch(images: list[np.ndarray], size: int, normalisation: str, device) -> torch.Tensor:
    """Images (uint8 (H, W, 3) or float (3, H, W) in [0, 1]) at ``size`` as the protocol resizes them
    (:func:`~brainldm.metrics.as_evaluated`), normalised as ``normalisation`` names -> (n, 3, size, size)."""
    return normalise(torch.from_numpy(np.stack([as_evaluated(im, size) for im in images])), normalisation).to(device)


def torchvision_extractor(name: str, device="cpu", weights: str | None = "DEFAULT") -> Extractor:
    """AlexNet layer 2 / 5, InceptionV3 avgpool or EffNet-B1 avgpool, with torchvision's ImageNet weights (``weights``
    None: random ones, for rehearsals)."""
    import torchvision  # only when these metrics are asked for (there is no CPU torchvision wheel everywhere)
    from torchvision.models.feature_extraction import create_feature_extractor

    if name in ("alexnet2", "alexnet5"):
        model = torchvision.models.alexnet(weights=weights)
        node = "features.4" if name == "alexnet2" else "features.11"
    elif name == "inception":
        model = torchvision.models.inception_v3(weights=weights, aux_logits=weights is not None, init_weights=False)
        node = "avgpool"
    else:
        model = torchvision.models.efficientnet_b1(weights=weights)
        node = "avgpool"
    size = METRICS[name].input_size
    extractor = create_feature_extractor(model.eval().to(device), return_nodes=[node])

    @torch.no_grad()
    def extract(images):
        return extractor(_batch(images, size, "imagenet", device))[node].flatten(1).cpu().numpy()

    return extract


def swav_extractor(device="cpu", random_weights: bool = False) -> Extractor:
    """SwAV ResNet-50 avgpool features through torch.hub (needs the hub cache or network), or torchvision's ResNet-50
    with random weights (``random_weights``, for rehearsals)."""
    if random_weights:
        import torchvision  # lazy: only where torchvision imports (not beside the CPU machines' torch)

        model = torchvision.models.resnet50(weights=None)
    else:
        model = torch.hub.load("facebookresearch/swav:main", "resnet50")
    model = model.eval().to(device)
    model.fc = torch.nn.Identity()

    @torch.no_grad()
    def extract(images):
        x = _batch(images, METRICS["swav"].input_size, "imagenet", device)
        return model(x).cpu().numpy()

    return extract


def clip_extractor(model=None, model_id: str = CLIP_MODEL, device="cpu") -> Extractor:
    """CLIP image embeddings: of ``model`` (any transformers CLIP vision model), or of the one ``model_id`` names (a
    Hub id or folder, ViT-L/14 by default, or a ``clip`` name in :mod:`brainldm.ldm.registry`)."""
    if model is None:
        from transformers import CLIPVisionModelWithProjection

        entry = registry.builder("clip", model_id)
        model = entry.build() if entry else CLIPVisionModelWithProjection.from_pretrained(model_id)
    model = model.eval().to(device)
    size = model.config.image_size

    @torch.no_grad()
    def extract(images):
        out = model(pixel_values=_batch(images, size, "clip", device))
        embedding = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
        return embedding.cpu().numpy()

    return extract


def stand_in_clip_extractor(model_id: str, device="cpu") -> Extractor | None:
    """The CLIP extractor an LDM is registered with in place of CLIP ViT-L/14 (:class:`~brainldm.ldm.registry.Builder`'s
    ``clip``: a model that ships its own contrastive image space, or a rehearsal's random one), or None: then CLIP
    ViT-L/14 scores it. Scores of a stand-in are not comparable with published CLIP figures."""
    entry = registry.builder("ldm", model_id)
    if entry is None or entry.clip is None:
        return None
    return clip_extractor(model_id=entry.clip, device=device)


TORCHVISION_METRICS = ("alexnet2", "alexnet5", "inception", "effnet", "swav")  # swav: a torch.hub ResNet-50
TORCHVISION_INSTALL = 'pip install -e ".[gpu]"'  # the README's GPU set-up: torchvision beside pip's CUDA torch


def check_torchvision(names: Sequence[str]) -> None:
    """Raise unless torchvision imports, when any of ``names`` needs it."""
    needs = [n for n in names if n in TORCHVISION_METRICS]
    if not needs:
        return
    try:
        import torchvision  # noqa: F401  (lazy: the CPU machines' torch has no torchvision that imports)
    except Exception as err:  # ModuleNotFoundError, or RuntimeError from a torchvision built for another torch
        keep = [n for n in names if n not in TORCHVISION_METRICS]
        raise InputError(
            f"metrics {', '.join(needs)} need torchvision, which cannot be imported here ({err.__class__.__name__}: "
            f"{' '.join(str(err).split())[:120]}); install it with {TORCHVISION_INSTALL}, or leave them out with "
            f"--metrics {','.join(keep) or 'pixcorr,ssim'}"
        ) from err


def unavailable_message(names: Sequence[str], unavailable: dict[str, str]) -> str:
    """One line on the metrics whose networks could not be loaded, and what to do."""
    said = "; ".join(f"{METRICS[n].title}: {reason}" for n, reason in unavailable.items())
    keep = [n for n in names if n not in unavailable]
    return (
        f"cannot compute {', '.join(unavailable)} ({said}); download their checkpoints once with network access "
        f"(CLIP: {CLIP_MODEL}; SwAV: torch.hub's facebookresearch/swav), or leave them out with "
        f"--metrics {','.join(keep) or 'pixcorr,ssim'}"
    )


def load_extractors(
    names: Sequence[str], overrides: dict[str, Extractor] | None = None, device="cpu", random_weights: bool = False
):
    """(extractors, unavailable reasons) for the feature metrics among ``names``; with ``random_weights``, every
    network at its real architecture with random weights (a rehearsal: shapes and costs, not scores)."""
    extractors, unavailable = dict(overrides or {}), {}
    for name in names:
        if METRICS[name].kind == "pixel" or name in extractors:
            continue
        try:
            if name == "clip":
                extractors[name] = clip_extractor(model_id=CLIP_MODEL, device=device)
            elif name == "swav":
                extractors[name] = swav_extractor(device, random_weights)
            else:
                extractors[name] = torchvision_extractor(name, device, None if random_weights else "DEFAULT")
        except Exception as err:  # an import, a download or a cache miss: say which, keep the other metrics
            unavailable[name] = f"{err.__class__.__name__}: {' '.join(str(err).split())[:300]}"
    return extractors, unavailable
