"""LDM features of the stimuli: z (VAE latents of the image) and c (CLIP text embeddings of its captions), and the
follow-up pipeline's decoding targets: BLIP image embeddings (``blip``) and DPT hidden states (``dpt``).

All functions take the LDM (a diffusers Stable Diffusion pipeline, see :mod:`brainldm.ldm`) and read shapes
from it, so SD-1.x (z 4x40x40, c 77x768), SD-2.x and ``tiny_ldm`` go through the same code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .presets import TAKAGI2023
from .storage import atomic_path
from .validation import InputError, check_sampling, oneline

ImageLike = Image.Image | np.ndarray


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """An image as an H x W x 3 uint8 array. Converts PIL modes and grey/RGBA arrays; rejects the rest."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InputError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got an array of shape {array.shape}"
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
            array = np.round(array * 255.0)
        else:
            raise InputError(f"expected uint8 pixels or floats in [0, 1], got dtype {array.dtype}")
        array = array.astype(np.uint8)
    return array


def images_to_tensor(images: Sequence[ImageLike], size: int, mean=None, std=None) -> torch.Tensor:
    """Resize images to ``size`` x ``size`` (bicubic, as the reference code) -> (n, 3, size, size) in [-1, 1], or,
    given a network's per-channel ``mean`` and ``std`` (of pixels in [0, 1]), normalised by them."""
    arrays = [
        np.asarray(Image.fromarray(to_rgb_array(im)).resize((size, size), Image.Resampling.BICUBIC)) for im in images
    ]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    if mean is None:
        return x / 127.5 - 1.0
    return (x / 255.0 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@torch.no_grad()
def encode_z(ldm, images: Sequence[ImageLike], image_size: int | None = None) -> torch.Tensor:
    """z: the VAE latent mean of each image at ``image_size``, times the VAE scaling factor.

    ``image_size`` defaults to the LDM's z size (320 for SD-1.x, see :func:`brainldm.ldm.ldm_sizes`).

    Returns a float32 CPU tensor (n, latent_channels, image_size / 8, image_size / 8): (n, 4, 40, 40) for SD-1.x.
    """
    from .ldm import ldm_sizes

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


# --- feature specs -------------------------------------------------------------------------------------------

UNET_BLOCKS = ("down0", "down1", "down2", "down3", "mid", "up0", "up1", "up2", "up3")
# How a U-Net tap (channels x height x width) is reduced as it is recorded: "mean" over space (C values), "poolN"
# (average over an N x N grid of regions: C x N x N) or "flatten" (all of it). With SD-1.4 on 320 px images the block
# outputs are 320x20x20 (down0), 640x10x10, 1280x5x5, 1280x5x5, 1280x5x5 (mid), 1280x10x10 (up0), 1280x20x20,
# 640x40x40 and 320x40x40 (up3): flattened, up2 is 4 MB per image (40 GB for a subject's 10,000); pool4 is 40 kB.
REDUCTIONS = ("mean", "pool2", "pool4", "pool8", "flatten")
# Features computed by models other than the LDM: the follow-up pipeline's captioner and depth model
AUXILIARY = ("blip", "dpt")


def reduce_tap(hidden: torch.Tensor, reduction: str) -> torch.Tensor:
    """A U-Net tap (n, C, H, W) reduced as :data:`REDUCTIONS` says -> (n, d) float32."""
    hidden = hidden.float()
    if reduction == "mean":
        return hidden.mean(dim=(2, 3))
    if reduction.startswith("pool"):
        return torch.nn.functional.adaptive_avg_pool2d(hidden, int(reduction[4:])).flatten(1)
    return hidden.flatten(1)


@dataclass(frozen=True)
class FeatureSpec:
    """One feature space, named as on the command line.

    - ``z``: VAE latent of the image; ``c``: mean CLIP text embedding of its captions.
    - ``zc@S``: the final latent of an img2img run from z, conditioned on c, at strength S (at z's resolution,
      so ``zc@S`` has z's shape and tends to z as S -> 0).
    - ``unet.BLOCK@S#K``: the output of U-Net block BLOCK (down0..down3, mid, up0..up3) at the K-th denoising step
      (1-based, of the steps the img2img run at strength S actually runs), conditional branch, reduced by the
      store's ``unet_reduce`` (:data:`REDUCTIONS`: spatial ``mean`` -> channels, ``poolN``, or ``flatten``).
    - ``blip``: BLIP's image embedding, every token (:mod:`brainldm.captioner`); ``dpt``: the four hidden states DPT
      passes to its neck (:mod:`brainldm.depth`). These come from their own models, not the LDM.
    """

    kind: str
    strength: float | None = None
    block: str | None = None
    step: int | None = None

    @classmethod
    def parse(cls, text: str) -> FeatureSpec:
        text = text.strip()
        try:
            if text in ("z", "c", *AUXILIARY):
                return cls(text)
            if text.startswith("zc@"):
                return cls("zc", strength=_strength(text[3:]))
            if text.startswith("unet."):
                block, rest = text[5:].split("@")
                strength, step = rest.split("#")
                if block not in UNET_BLOCKS:
                    raise ValueError(f"unknown U-Net block {block!r}; expected one of {UNET_BLOCKS}")
                if int(step) < 1:
                    raise ValueError("the step is 1-based")
                return cls("unet", strength=_strength(strength), block=block, step=int(step))
        except ValueError as err:
            raise InputError(f"bad feature {text!r}: {err}") from err
        raise InputError(f"unknown feature {text!r}; expected z, c, zc@STRENGTH, unet.BLOCK@STRENGTH#STEP, blip or dpt")

    @property
    def name(self) -> str:
        if self.kind == "zc":
            return f"zc@{self.strength:g}"
        if self.kind == "unet":
            return f"unet.{self.block}@{self.strength:g}#{self.step}"
        return self.kind


def _strength(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(f"strength must be in (0, 1], got {value}")
    return value


def parse_features(text: str) -> list[FeatureSpec]:
    """``"z,c,zc@0.5"`` -> specs, in order, without duplicates."""
    specs = {}
    for part in text.split(","):
        if part.strip():
            spec = FeatureSpec.parse(part)
            specs[spec.name] = spec
    if not specs:
        raise InputError("no features given; e.g. --features z,c")
    return list(specs.values())


def steps_run(num_inference_steps: int, strength: float) -> int:
    """How many denoising steps img2img runs at a strength (as diffusers defines it)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def check_step(spec: FeatureSpec, num_inference_steps: int) -> None:
    """A U-Net tap must name a step that its img2img run actually runs."""
    n_steps = steps_run(num_inference_steps, spec.strength)
    if spec.step > n_steps:
        raise InputError(
            f"{spec.name}: at strength {spec.strength:g} img2img runs only {n_steps} of {num_inference_steps} steps"
        )


# --- zc and U-Net taps: one img2img run per strength ---------------------------------------------------------


def image_generators(nsd_ids: Sequence[int], seed: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, nsd_id): the noise of an image does not depend on its batch."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in nsd_ids]


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


# --- the feature store: safetensors shards keyed by nsd_id ---------------------------------------------------


class FeatureStore:
    """Features of one space for many images, as ``ROOT/NAME/shard-*.safetensors`` keyed by ``nsd_id``.

    Each shard holds ``nsd_id`` (n,) and ``features`` (n, ...); ``config.json`` records how they were computed,
    so a store is never silently extended with features of another model or setting. Shards are written to a
    temporary name and renamed, so a killed run leaves only whole shards, and a rerun computes only what is missing.
    Images are keys, not subjects: one store serves every subject who saw them.

    ``part``: the process number when several processes fill the store at once; each writes ``partK-*`` files of
    its own (read like shards), and :meth:`merge_parts` renames them into shards once all have finished.
    """

    def __init__(self, root: str | Path, name: str, config: dict | None = None, part: int | None = None):
        self.folder = Path(root) / name
        self.name = name
        self.part = part
        self.written = 0  # images this object wrote
        self.reused = 0  # of the images an extraction asked for, those the store held already
        config_path = self.folder / "config.json"
        if config_path.exists():
            stored = json.loads(config_path.read_text())
            if "model" in stored:  # stores written before the key was model_id, as everywhere else
                stored["model_id"] = stored.pop("model")
            if config is not None and stored != config:
                changed = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
                raise InputError(
                    f"{self.folder} holds {name} features computed with other settings ({', '.join(changed)}: "
                    f"{[stored.get(k) for k in changed]} there, {[config.get(k) for k in changed]} now); "
                    "use another --out folder or delete that one"
                )
            self.config = stored
        elif config is None:
            raise InputError(f"no {name} features in {Path(root)} (no {config_path}); run scripts/extract_features.py")
        else:
            with atomic_path(config_path) as tmp:
                tmp.write_text(json.dumps(config, indent=2))
            self.config = config
        self._index: dict[int, tuple[Path, int]] | None = None

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.safetensors")) + sorted(self.folder.glob("part*-*.safetensors"))

    def _next(self, prefix: str) -> int:
        """The number after the last file named ``prefix-NNNNN`` (numbers are never reused, even after a merge)."""
        numbers = [int(p.stem.rsplit("-", 1)[1]) for p in self.folder.glob(f"{prefix}-*.safetensors")]
        return max(numbers, default=-1) + 1

    @property
    def index(self) -> dict[int, tuple[Path, int]]:
        """nsd_id -> (shard, row)."""
        if self._index is None:
            self._index = {}
            for shard in self._shards():
                for row, nsd_id in enumerate(_read_tensor(shard, "nsd_id").tolist()):
                    self._index[nsd_id] = (shard, row)
        return self._index

    def missing(self, nsd_ids: Sequence[int]) -> list[int]:
        return [int(i) for i in nsd_ids if int(i) not in self.index]

    def write(self, nsd_ids: Sequence[int], features: torch.Tensor | np.ndarray) -> Path:
        """Add one shard of features (n, ...) for ``nsd_ids`` (n,)."""
        prefix = "shard" if self.part is None else f"part{self.part}"
        path = self.folder / f"{prefix}-{self._next(prefix):05d}.safetensors"
        tensors = {
            "nsd_id": np.asarray(nsd_ids, dtype=np.int64),
            "features": np.ascontiguousarray(np.asarray(features, dtype=np.float32)),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"feature": self.name})
        for row, nsd_id in enumerate(tensors["nsd_id"].tolist()):
            self.index[nsd_id] = (path, row)
        self.written += len(tensors["nsd_id"])
        return path

    def merge_parts(self) -> int:
        """Rename every process's parts into shards, in the order of their first image (the order one process
        writes its batches in, so the store is the one a single process writes); returns how many. Run it once
        every process has finished. Renames are atomic: a merge killed halfway is finished by the next one."""
        parts = sorted(self.folder.glob("part*-*.safetensors"), key=lambda p: int(_read_tensor(p, "nsd_id")[0]))
        for number, part in enumerate(parts, self._next("shard")):
            part.replace(self.folder / f"shard-{number:05d}.safetensors")
        self.refresh()
        return len(parts)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one image's features, read from a shard's header (nothing is loaded); () when empty."""
        shards = self._shards()
        if not shards:
            return ()
        try:
            with safe_open(str(shards[0]), framework="numpy") as f:
                return tuple(f.get_slice("features").get_shape()[1:])
        except Exception as err:  # safetensors raises several types for a truncated or foreign file
            raise InputError(f"could not read feature shard {shards[0]}: {oneline(err)}; delete it and rerun") from err

    def blocks(self, *id_lists: Sequence[int], max_values: int = 2**28) -> Iterator[tuple[np.ndarray, ...]]:
        """The features of each list of ids, a block of columns at a time, each flattened -> tuples of (len(ids),
        block width) float32 arrays, in the order of the flattened features; at most ``max_values`` values per tuple
        (1 GiB by default) where one row of the second axis fits, so a feature space of any width is read without
        being held whole. Blocks are ranges of the first axis (channels, tokens), or, where one entry of it is already
        too wide (DPT's four states of 577 x 1024), ranges of the second axis within each entry."""
        for index in self.block_index(sum(map(len, id_lists)), max_values):
            yield tuple(self.load(ids, index).reshape(len(ids), -1) for ids in id_lists)

    def block_index(self, n_images: int, max_values: int = 2**28) -> list[tuple[slice, ...]]:
        """The index of each block :meth:`blocks` reads for ``n_images`` images (slices of the leading axes)."""
        shape = self.feature_shape
        per_entry = int(np.prod(shape[1:]))
        if len(shape) < 2 or n_images * per_entry <= max_values:
            step = max(1, max_values // max(1, n_images * per_entry))
            return [(slice(start, min(start + step, shape[0])),) for start in range(0, shape[0], step)]
        step = max(1, max_values // max(1, n_images * int(np.prod(shape[2:]))))
        return [
            (slice(entry, entry + 1), slice(start, min(start + step, shape[1])))
            for entry in range(shape[0])
            for start in range(0, shape[1], step)
        ]

    def refresh(self) -> None:
        """Forget the cached index: the folder changed under this object (another process merged its parts)."""
        self._index = None

    def load(self, nsd_ids: Sequence[int], channels: slice | tuple[slice, ...] | None = None) -> np.ndarray:
        """Features of ``nsd_ids`` in that order -> (n, ...) float32. Every id must be present. ``channels``: only
        that range of the first feature axis, or those ranges of the leading axes (a block of a feature space too
        large to hold whole)."""
        missing = self.missing(nsd_ids)
        if missing:
            raise InputError(
                f"{self.name} features are missing for {len(missing)} of {len(nsd_ids)} images (e.g. nsd_id "
                f"{missing[0]}) in {self.folder}; run scripts/extract_features.py for this subject"
            )
        rows_by_shard: dict[Path, list[int]] = {}
        for position, nsd_id in enumerate(nsd_ids):
            rows_by_shard.setdefault(self.index[int(nsd_id)][0], []).append(position)
        out = None
        for shard, positions in rows_by_shard.items():
            block = _read_tensor(shard, "features", channels)
            if out is None:
                out = np.empty((len(nsd_ids), *block.shape[1:]), dtype=np.float32)
            out[positions] = block[[self.index[int(nsd_ids[p])][1] for p in positions]]
        return out if out is not None else np.empty((0,), dtype=np.float32)


def _read_tensor(shard: Path, key: str, channels: slice | tuple[slice, ...] | None = None) -> np.ndarray:
    try:
        with safe_open(str(shard), framework="numpy") as f:
            if channels is None:
                return f.get_tensor(key)
            leading = channels if isinstance(channels, tuple) else (channels,)
            return f.get_slice(key)[(slice(None), *leading)]
    except Exception as err:  # safetensors raises several types for a truncated or foreign file
        raise InputError(f"could not read feature shard {shard}: {oneline(err)}; delete it and rerun") from err


def load_features(root: str | Path, name: str, nsd_ids: Sequence[int]) -> np.ndarray:
    """Stored features ``name`` (e.g. ``"z"``) of ``nsd_ids`` -> (n, ...) float32."""
    return FeatureStore(root, name).load(nsd_ids)


# --- extraction ----------------------------------------------------------------------------------------------


def extract_features(
    ldm,
    model_id: str,
    nsd_ids: Sequence[int],
    get_item,
    specs: Sequence[FeatureSpec],
    out: str | Path,
    batch_size: int = 8,
    num_inference_steps: int = TAKAGI2023.sampling.num_inference_steps,
    guidance_scale: float = TAKAGI2023.sampling.guidance_scale,
    seed: int = TAKAGI2023.sampling.seed,
    unet_reduce: str = "mean",
    progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] | None = None,
    auxiliary: dict[str, tuple[dict, Callable]] | None = None,
) -> dict[str, FeatureStore]:
    """Compute the missing features of ``nsd_ids`` in batches and store them under ``out``.

    Args:
        ldm: a diffusers Stable Diffusion pipeline (see :func:`brainldm.ldm.load_ldm`).
        model_id: recorded with the features, so stores of different models never mix.
        nsd_ids: unique image ids (of one subject or several: what a store holds already is not computed again).
        get_item: ``nsd_id -> (image, captions)``.
        specs: the feature spaces (see :class:`FeatureSpec`).
        process_index, num_processes, wait_for_everyone: data parallelism (accelerate's ``PartialState`` gives all
            three). The missing images are cut into the batches one process would run, and process k runs batches
            k, k + n, ...; each writes its own parts, and once ``wait_for_everyone()`` returns, process 0 merges
            them (:meth:`FeatureStore.merge_parts`) into the store one process would have written.
        auxiliary: for features of other models than the LDM (``blip``, ``dpt``), name -> (what their store records,
            such as the model id, and a function of a batch of images -> its features):
            :func:`brainldm.captioner.blip_feature`, :func:`brainldm.depth.dpt_feature`.
    Returns:
        name -> FeatureStore (``written``: the images this process computed; ``reused``: those the store held).
    """
    if num_processes > 1 and wait_for_everyone is None:
        raise ValueError("several processes need wait_for_everyone, so that the parts are merged after all finish")
    if unet_reduce not in REDUCTIONS:
        raise InputError(f"unet_reduce must be one of {REDUCTIONS}, got {unet_reduce!r}")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if any(spec.kind in ("zc", "unet") for spec in specs):
        check_sampling(ldm.scheduler, num_inference_steps, guidance_scale)
    from .ldm import ldm_sizes

    auxiliary = auxiliary or {}
    for spec in specs:
        if spec.kind in AUXILIARY and spec.kind not in auxiliary:
            model = "BLIP captioner" if spec.kind == "blip" else "DPT depth model"
            raise InputError(f"{spec.name} features are computed by a {model}, and none was given")
    common = {"model_id": model_id, "z_image_size": ldm_sizes(ldm)[0]}
    run = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed}

    def config_of(spec: FeatureSpec) -> dict:
        """How the features are computed, as the store records it."""
        if spec.kind in AUXILIARY:
            return dict(auxiliary[spec.kind][0], feature=spec.name)
        config = dict(common, feature=spec.name)
        if spec.kind in ("zc", "unet"):
            config.update(run, strength=spec.strength)
        if spec.kind == "unet":
            config["unet_reduce"] = unet_reduce
            check_step(spec, num_inference_steps)
        return config

    # every process checks (or writes, atomically and identically) each config.json, so a mismatch stops them all
    part = process_index if num_processes > 1 else None
    stores = {spec.name: FeatureStore(out, spec.name, config_of(spec), part) for spec in specs}

    missing = {name: store.missing(nsd_ids) for name, store in stores.items()}
    for name, store in stores.items():
        store.reused = len(nsd_ids) - len(missing[name])
    todo = sorted({i for ids in missing.values() for i in ids})
    if num_processes > 1:
        wait_for_everyone()  # every process has listed the stores before any writes: all cut the same batches
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    mine = batches[process_index::num_processes]
    desc = "features" if num_processes == 1 else f"features [{process_index}]"
    bar = tqdm(total=sum(map(len, mine)), desc=desc, unit="image", disable=not progress)
    for batch in mine:
        images, captions = zip(*(get_item(i) for i in batch))
        need = {name for name, store in stores.items() if store.missing(batch)}
        from_ldm = need - {"c", *AUXILIARY}
        z = encode_z(ldm, images) if from_ldm else None
        c = encode_c(ldm, captions) if from_ldm - {"z"} or "c" in need else None
        computed = {"z": z, "c": c}
        computed.update({name: auxiliary[name][1](images) for name in need & set(AUXILIARY)})
        strengths = sorted({stores[n].config["strength"] for n in need if "strength" in stores[n].config})
        for strength in strengths:
            taps = [s for s in specs if s.name in need and s.kind == "unet" and s.strength == strength]
            zc, recorded = img2img_latents(
                ldm, z, c, batch, strength, num_inference_steps, guidance_scale, seed, taps, unet_reduce
            )
            computed.update(recorded)
            computed[f"zc@{strength:g}"] = zc
        for name in need:
            missing = set(stores[name].missing(batch))
            rows = [k for k, i in enumerate(batch) if i in missing]
            stores[name].write([batch[k] for k in rows], computed[name][rows])
        bar.update(len(batch))
    bar.close()
    if num_processes > 1:
        wait_for_everyone()
    if process_index == 0:
        for store in stores.values():
            store.merge_parts()  # also finishes the merge of an earlier killed sharded run
    if num_processes > 1:
        wait_for_everyone()  # every process returns stores that read the merged shards
        for store in stores.values():
            store.refresh()
    return stores
