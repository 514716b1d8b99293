"""The feature store: LDM features of the stimuli on disk, by name, and the grammar of those names.

A feature is named ``z``, ``c``, ``zc@0.5``, ``unet:down1@0.4/pool4``, ``blip`` or ``dpt`` (:class:`FeatureSpec`);
:class:`FeatureStore` keeps one name's features as safetensors shards keyed by ``nsd_id``, written atomically and
resumably. Extraction (:mod:`brainldm.ldm.extraction`) writes stores; decoding and encoding read them, so neither
needs the LDM.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from brainldm.paths import atomic_path
from brainldm.validation import InputError, oneline

# --- feature specs -------------------------------------------------------------------------------------------

UNET_BLOCKS = ("down0", "down1", "down2", "down3", "mid", "up0", "up1", "up2", "up3")
# How a U-Net tap (channels x height x width) is reduced as it is recorded: "mean" over space (C values), "poolN"
# (average over an N x N grid of regions: C x N x N) or "flatten" (all of it). With SD-1.4 on 320 px images the block
# outputs are 320x20x20 (down0), 640x10x10, 1280x5x5, 1280x5x5, 1280x5x5 (mid), 1280x10x10 (up0), 1280x20x20,
# 640x40x40 and 320x40x40 (up3): flattened, up2 is 4 MB per image (40 GB for a subject's 10,000); pool4 is 40 kB.
REDUCTIONS = ("mean", "pool2", "pool4", "pool8", "flatten")
# Features computed by models other than the LDM: the follow-up pipeline's captioner and depth model
AUXILIARY = ("blip", "dpt")


@dataclass(frozen=True)
class FeatureSpec:
    """One feature space, named as on the command line.

    - ``z``: VAE latent of the image; ``c``: mean CLIP text embedding of its captions.
    - ``zc@S``: the final latent of an img2img run from z, conditioned on c, at strength S (at z's resolution,
      so ``zc@S`` has z's shape and tends to z as S -> 0).
    - ``unet.BLOCK@S#K``: the output of U-Net block BLOCK (down0..down3, mid, up0..up3) at the K-th denoising step
      (1-based, of the steps the img2img run at strength S actually runs), conditional branch, reduced by the
      store's ``unet_reduce`` (:data:`REDUCTIONS`: spatial ``mean`` -> channels, ``poolN``, or ``flatten``).
    - ``blip``: BLIP's image embedding, every token (:mod:`brainldm.ldm.captioner`); ``dpt``: the four hidden states DPT
      passes to its neck (:mod:`brainldm.ldm.depth`). These come from their own models, not the LDM.
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


# --- the feature store: safetensors shards keyed by nsd_id ---------------------------------------------------


class FeatureStore:
    """Features of one space for many images, as ``ROOT/NAME/shard-*.safetensors`` keyed by ``nsd_id``.

    Each shard holds ``nsd_id`` (n,) and ``features`` (n, ...); ``config.json`` records how they were computed,
    so a store is never silently extended with features of another model or setting. Shards are written to a
    temporary name and renamed, so a killed run leaves only whole shards, and a rerun computes only what is missing.
    Images are keys, not subjects: one store serves every subject who saw them. Features are stored as float32, or
    as float16 where the config says ``"dtype": "float16"``; they are read as float32 either way.

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
            "features": np.ascontiguousarray(np.asarray(features, dtype=self.config.get("dtype", "float32"))),
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
