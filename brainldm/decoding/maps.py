"""SubjectMaps: everything that turns one subject's betas into the LDM's conditioning targets, fitted, saved, shared.

A subject's maps are keyed by target name: for Stable Diffusion ``z`` (image latent, from ``early`` voxels) and ``c``
(CLIP text embedding, from ``ventral`` voxels), as ``TAKAGI2023.decoders`` says. An LDM with other targets adds
entries there, not code paths here. Each target's map standardises its voxels with training statistics and applies
a ridge solution (``brainldm.decoding.ridge``): ``y = ((betas[:, voxels] - mean) / std) @ W + b``. W is stored dense,
or as a low-rank product ``A @ B`` chosen at fit time (the rank-r map that best preserves the training predictions);
fitting lives apart, in :mod:`brainldm.decoding.fit`.

On disk and on the Hub a SubjectMaps is a folder, through huggingface_hub's ``ModelHubMixin``:
``config.json`` (the typed :class:`MapsConfig`, the source of truth on load), ``maps.safetensors`` (the tensors,
and each test image's decoding scores) and a model card ``README.md``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard, ModelHubMixin, hf_hub_download
from safetensors import safe_open
from safetensors.torch import save_file

from brainldm import __version__
from brainldm.cards import maps_card
from brainldm.data.voxels import VoxelTable
from brainldm.paths import subject_name
from brainldm.validation import InputError, check_finite, oneline

WEIGHTS_FILE = "maps.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "brainldm-subject-maps/2"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# How decoded targets may be rescaled to the training distribution (see LinearMap.rescale); None keeps the ridge
# predictions as they are (the paper's behaviour)
RESCALE_MODES = ("dimension", "target")


def voxel_fingerprint(voxels: VoxelTable) -> str:
    """A short hash of the voxel table's grid and coordinates: maps only apply to betas over the same voxels."""
    digest = hashlib.sha256(np.asarray(voxels.grid_shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(voxels.ijk, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


# --- one linear map ------------------------------------------------------------------------------------------


@dataclass
class LinearMap:
    """Voxels -> one flattened feature. ``weight`` (k, T) dense, or ``left`` (k, r) @ ``right`` (r, T)."""

    voxels: torch.Tensor  # (k,) indices into the voxel table
    ijk: torch.Tensor  # (k, 3)
    mean: torch.Tensor  # (k,)
    std: torch.Tensor  # (k,)
    intercept: torch.Tensor  # (T,)
    best_alphas: torch.Tensor  # (T,)
    weight: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    # rescaling statistics (T,): the training targets' mean and std, and the out-of-fold predictions'; None in maps
    # fitted before they existed
    target_mean: torch.Tensor | None = None
    target_std: torch.Tensor | None = None
    prediction_mean: torch.Tensor | None = None
    prediction_std: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rank(self) -> int | None:
        return None if self.weight is not None else self.left.shape[1]

    @property
    def n_weights(self) -> int:
        parts = [self.weight] if self.weight is not None else [self.left, self.right]
        return sum(p.numel() for p in parts)

    def predict(self, betas: torch.Tensor) -> torch.Tensor:
        """betas over the whole voxel table (n, n_voxels) -> (n, T) float32 on the map's compute device."""
        device = betas.device
        key = str(device)
        if key not in self._cache:  # float32 copies on the compute device, made once
            parts = [self.weight] if self.weight is not None else [self.left, self.right]
            self._cache[key] = [p.to(device=device, dtype=torch.float32) for p in parts]
        x = (betas[:, self.voxels.to(device)].float() - self.mean.to(device)) / self.std.to(device)
        parts = self._cache[key]
        y = x @ parts[0] if len(parts) == 1 else (x @ parts[0]) @ parts[1]
        return y + self.intercept.to(device)

    @property
    def can_rescale(self) -> bool:
        return self.prediction_std is not None

    def rescale(self, y: torch.Tensor, mode: str) -> torch.Tensor:
        """Predictions (n, T) moved from the spread ridge predictions have to the training targets' spread.

        ``mode``: ``"dimension"`` maps each dimension's out-of-fold prediction mean and std onto the targets' (as
        Brain-Diffuser does, with statistics from the test predictions there); ``"target"`` keeps each dimension's
        mean shift but scales all dimensions by one factor, the targets' overall std over the predictions'.
        """
        if mode not in RESCALE_MODES or not self.can_rescale:
            raise InputError(f"cannot rescale with mode {mode!r}: see SubjectMaps.check_rescale")
        stats = [t.to(y.device, torch.float32) for t in (self.target_mean, self.target_std, self.prediction_mean,
                                                          self.prediction_std)]  # fmt: skip
        target_mean, target_std, prediction_mean, prediction_std = stats
        if mode == "dimension":
            scale = target_std / prediction_std.clamp_min(1e-6 * float(target_std.mean()) + 1e-12)
        else:
            scale = target_std.square().mean().sqrt() / prediction_std.square().mean().sqrt().clamp_min(1e-12)
        return (y - prediction_mean) * scale + target_mean

    def tensors(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {
            "voxels": self.voxels,
            "ijk": self.ijk,
            "mean": self.mean,
            "std": self.std,
            "intercept": self.intercept,
            "best_alphas": self.best_alphas,
        }
        if self.weight is not None:
            out["weight"] = self.weight.to(dtype)
        else:
            out["left"], out["right"] = self.left.to(dtype), self.right.to(dtype)
        if self.can_rescale:
            out.update(target_mean=self.target_mean, target_std=self.target_std, prediction_mean=self.prediction_mean,
                       prediction_std=self.prediction_std)  # fmt: skip
        return {f"{prefix}.{k}": v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> LinearMap:
        get = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        return cls(**get)


# --- the subject's maps --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetConfig:
    """One decoded target: the ROI it is read from, its shape for the LDM, its voxel count and stored rank.

    ``spread``: the training targets' and the out-of-fold predictions' overall standard deviation (root mean square
    over dimensions), ``{"target_std": ..., "prediction_std": ...}``; their ratio is what ``rescale="target"``
    multiplies by. None for maps fitted before brainldm stored it. ``model_id``: the model whose features the target
    is, where that is not the LDM (the captioner for ``blip``, the depth model for ``dpt``). ``preprocessing``: how the
    target's pictures were prepared, as its feature store recorded it (:data:`brainldm.images.PREPROCESSING`; None for
    features computed before brainldm recorded it). ``roi`` may be a union of ROIs (``early+ventral``).
    """

    roi: str
    shape: tuple[int, ...]
    n_voxels: int
    rank: int | None = None
    spread: dict[str, float] | None = None
    model_id: str | None = None
    preprocessing: dict[str, str] | None = None


@dataclass(frozen=True)
class MapsConfig:
    """What a subject's maps are: written to ``config.json``, and the source of truth when they are loaded.

    ``data`` is the Hub dataset repo id the maps were fitted on, or None for a local folder (a local path is
    nobody else's business, and the config is published). ``scores`` holds, per target, the CV r and the test
    split's mean scores (see :func:`decoding_scores`).
    """

    subject: int
    model_id: str
    n_voxels: int
    voxel_fingerprint: str
    targets: dict[str, TargetConfig]
    alphas: tuple[float, ...]
    cv: int
    n_train: int
    n_test: int
    storage_dtype: str = "float32"
    data: str | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    format: str = FORMAT
    brainldm_version: str = __version__

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config.json") -> MapsConfig:
        if values.get("format") != FORMAT:
            raise InputError(
                f"{source} is not a config of brainldm subject maps in format {FORMAT!r} (found "
                f"{values.get('format')!r}); refit the maps with scripts/fit_maps.py"
            )
        try:
            targets = {name: TargetConfig(**{**t, "shape": tuple(t["shape"])}) for name, t in values["targets"].items()}
            known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
            return cls(**{**known, "targets": targets, "alphas": tuple(values["alphas"])})
        except (KeyError, TypeError) as err:
            raise InputError(f"{source} is damaged or incomplete ({oneline(err)}); download or refit the maps") from err


class SubjectMaps(ModelHubMixin):
    """One subject's maps, keyed by target name (``maps["z"]``, ``maps["c"]``), and how they scored.

    Use :func:`fit_subject_maps` to make them, :meth:`from_pretrained` to load them (a local folder or a Hub repo,
    with huggingface_hub's usual ``revision``, ``cache_dir``, ``token``, ``local_files_only`` and
    ``force_download``), :meth:`predict` to decode. ``per_image`` holds each test image's decoding scores from fit
    time (``nsd_id``, ``<target>.r``, ``<target>.rank``), so a demo can show them without re-encoding the images.
    """

    def __init__(self, maps: dict[str, LinearMap], config: MapsConfig, per_image: dict[str, np.ndarray] | None = None):
        if set(maps) != set(config.targets):
            raise InputError(f"maps for {sorted(maps)} do not match the config's targets {sorted(config.targets)}")
        self.maps = maps
        self.config = config
        self.per_image = per_image or {}

    def __getitem__(self, target: str) -> LinearMap:
        return self.maps[target]

    @property
    def subject(self) -> int:
        return self.config.subject

    @property
    def model_id(self) -> str:
        return self.config.model_id

    def check_voxels(self, voxels: VoxelTable) -> None:
        """Raise unless ``voxels`` is the voxel table these maps were fitted on."""
        cfg = self.config
        if voxels.subject != cfg.subject or voxel_fingerprint(voxels) != cfg.voxel_fingerprint:
            raise InputError(
                f"these maps were fitted on subject {cfg.subject}'s voxel table ({cfg.n_voxels} voxels, "
                f"fingerprint {cfg.voxel_fingerprint}), but the betas come from subject {voxels.subject}'s "
                f"({len(voxels)} voxels, fingerprint {voxel_fingerprint(voxels)}); use the maps of that subject"
            )

    @property
    def can_rescale(self) -> bool:
        """Whether every map carries the rescaling statistics (maps fitted before brainldm stored them do not)."""
        return all(m.can_rescale for m in self.maps.values())

    def check_rescale(self, rescale: str | None) -> None:
        """Raise unless ``rescale`` is None, or a mode these maps carry the statistics for (maps fitted before brainldm
        stored them carry none)."""
        if rescale is None:
            return
        if rescale not in RESCALE_MODES:
            raise InputError(f"rescale must be None or one of {RESCALE_MODES}, got {rescale!r}")
        if not self.can_rescale:
            raise InputError(
                f"subject {self.subject}'s maps carry no rescaling statistics (they were fitted before brainldm "
                "stored them); refit them with scripts/fit_maps.py to rescale, or decode without rescaling"
            )

    @torch.no_grad()
    def predict(
        self, betas, voxels: VoxelTable | None = None, device=None, rescale: str | None = None
    ) -> dict[str, torch.Tensor]:
        """betas (n, n_voxels) over the subject's voxel table -> {target: (n, *shape)} float32, e.g. z and c.

        Pass the betas' ``voxels`` table to check it is the one the maps were fitted on. ``rescale`` (``"dimension"``
        or ``"target"``, see :meth:`LinearMap.rescale`) moves the predictions to the training targets' spread, which
        ridge shrinks them from; None (the paper's behaviour) returns them as fitted.
        """
        self.check_rescale(rescale)
        if voxels is not None:
            self.check_voxels(voxels)
        betas = torch.as_tensor(np.asarray(betas) if not torch.is_tensor(betas) else betas, dtype=torch.float32)
        if betas.ndim == 1:
            betas = betas[None]
        if betas.ndim != 2 or betas.shape[1] != self.config.n_voxels:
            raise InputError(
                f"betas have shape {tuple(betas.shape)}, but subject {self.subject}'s maps expect (n, "
                f"{self.config.n_voxels}) over their voxel table; are these betas from another subject or dataset?"
            )
        check_finite("betas", betas)
        if device is not None:
            betas = betas.to(device)
        out = {}
        for name, target in self.config.targets.items():
            y = self.maps[name].predict(betas)
            if rescale is not None:
                y = self.maps[name].rescale(y, rescale)
            out[name] = y.reshape(len(betas), *target.shape)
        return out

    def image_scores(self, nsd_id: int) -> dict[str, dict[str, float]] | None:
        """The fit-time test scores of one image, ``{target: {"r": ..., "rank": ...}}`` for every target, or None if
        it was not scored."""
        if not self.per_image:
            return None
        found = np.flatnonzero(self.per_image["nsd_id"] == int(nsd_id))
        if not len(found):
            return None
        row = found[0]
        return {
            name: {"r": float(self.per_image[f"{name}.r"][row]), "rank": int(self.per_image[f"{name}.rank"][row])}
            for name in self.config.targets
        }

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weights (every target's map, in the storage dtype)."""
        itemsize = torch.finfo(STORAGE_DTYPES[self.config.storage_dtype]).bits // 8
        return sum(m.n_weights for m in self.maps.values()) * itemsize

    # --- the three doors (ModelHubMixin) ---

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> Path:
        """Write ``maps.safetensors``, ``config.json`` and ``README.md`` into ``save_directory``, atomically."""
        folder = Path(save_directory)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        staging.chmod(0o755)  # mkdtemp makes it private; the maps are meant to be shared
        try:
            super().save_pretrained(staging, **kwargs)
            if folder.exists():
                for path in staging.iterdir():
                    path.replace(folder / path.name)
                staging.rmdir()
            else:
                staging.rename(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    def _save_pretrained(self, save_directory: Path) -> None:
        dtype = STORAGE_DTYPES[self.config.storage_dtype]
        tensors = {}
        for name, linear in self.maps.items():
            tensors.update(linear.tensors(name, dtype))
        tensors.update({f"per_image.{k}": torch.as_tensor(v).contiguous() for k, v in self.per_image.items()})
        save_file(tensors, str(save_directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        (save_directory / WEIGHTS_FILE).chmod(0o644)
        (save_directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> SubjectMaps:
        """Load from a local folder or a Hub model repo (through the Hugging Face cache; offline once cached).

        Takes huggingface_hub's download arguments: ``revision``, ``cache_dir``, ``token``, ``local_files_only``,
        ``force_download``.
        """
        source = str(pretrained_model_name_or_path)
        local = Path(source)
        if local.is_dir() and not (local / WEIGHTS_FILE).is_file():
            raise InputError(f"{local} has no {WEIGHTS_FILE}; is it a folder written by scripts/fit_maps.py?")
        try:
            return super().from_pretrained(source, **kwargs)
        except InputError:
            raise
        except json.JSONDecodeError as err:  # ModelHubMixin reads config.json itself
            raise InputError(
                f"the {CONFIG_FILE} of {source} is not valid JSON ({oneline(err)}); it may have been edited or "
                "truncated: write the maps again with scripts/fit_maps.py (or download them again)"
            ) from err
        except (OSError, ValueError) as err:  # huggingface_hub's HTTP, offline and not-in-cache errors
            if local.is_dir():
                raise
            raise InputError(
                f"could not get subject maps from {source!r}: it is not a local folder, and the Hub download "
                f"failed ({err.__class__.__name__}: {oneline(err)}). With HF_HUB_OFFLINE=1 the maps must already be "
                "in the Hugging Face cache."
            ) from err

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir,
        force_download: bool,
        local_files_only: bool,
        token,
        config: dict | None = None,
        **kwargs,
    ) -> SubjectMaps:
        if Path(model_id).is_dir():
            path = Path(model_id) / WEIGHTS_FILE
        else:
            path = hf_hub_download(
                model_id, WEIGHTS_FILE, revision=revision, cache_dir=cache_dir, force_download=force_download,
                local_files_only=local_files_only, token=token,
            )  # fmt: skip
        if config is None:
            raise InputError(f"{model_id} has no {CONFIG_FILE}; is it a folder written by scripts/fit_maps.py?")
        return cls.load(path, MapsConfig.from_dict(config, f"{model_id}/{CONFIG_FILE}"))

    @classmethod
    def load(cls, path: str | Path, config: MapsConfig) -> SubjectMaps:
        """Load a ``maps.safetensors`` file described by ``config``."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise InputError(
                f"could not read {path}: {oneline(err)}; the file is truncated or not a safetensors file "
                "(delete it from the cache or re-download it)"
            ) from err
        if metadata.get("format") != FORMAT:
            raise InputError(f"{path} is a safetensors file but not brainldm subject maps (format {FORMAT!r})")
        maps = {}
        for name in config.targets:
            linear = LinearMap.from_tensors(tensors, name)
            for part in ("weight", "left", "right"):  # decode in float32 whatever the storage dtype
                if getattr(linear, part) is not None:
                    setattr(linear, part, getattr(linear, part).float())
            maps[name] = linear
        prefix = "per_image."
        per_image = {k[len(prefix) :]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}
        return cls(maps, config, per_image)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload these maps to a Hub model repo (its card names ``repo_id``); returns the commit's URL.

        Takes ModelHubMixin's arguments: ``private``, ``token``, ``branch``, ``create_pr``, ``commit_message``...
        """
        kwargs.setdefault("commit_message", f"Upload subject {self.subject}'s brainldm maps")
        kwargs["model_card_kwargs"] = {"repo_id": repo_id, **(kwargs.get("model_card_kwargs") or {})}
        return str(super().push_to_hub(repo_id, **kwargs))

    def generate_model_card(self, repo_id: str | None = None, **kwargs) -> ModelCard:
        """The model card: YAML metadata (licences, base model, dataset, model-index results) and usage."""
        return maps_card(self.config, repo_id or f"<user>/brainldm-{subject_name(self.config.subject)}")
