"""SubjectMaps: everything that turns one subject's betas into the LDM's (z, c), fitted, saved and shared.

A map standardises its voxels with training statistics and applies a ridge solution (``brainldm.ridge``):
``y = ((betas[:, voxels] - mean) / std) @ W + b``. W is stored dense, or as a low-rank product ``A @ B`` chosen
at fit time (the rank-r map that best preserves the training predictions), in fp32 or fp16.

On disk (and on the Hub) a SubjectMaps is a folder: ``maps.safetensors`` (tensors + string metadata),
``config.json`` and a model card ``README.md``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .data import VoxelTable, load_trials, load_voxels
from .features import FeatureStore
from .metrics import dimension_correlation, pattern_correlation, two_way_identification
from .presets import TAKAGI2023
from .ridge import RidgeCV, reduced_rank
from .validation import InputError, check_finite, oneline

WEIGHTS_FILE = "maps.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "brainldm-subject-maps/1"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


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
        return {f"{prefix}.{k}": v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> LinearMap:
        get = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        return cls(**get)


def fit_linear_map(
    betas: np.ndarray,
    targets: np.ndarray,
    voxels: np.ndarray,
    ijk: np.ndarray,
    groups: np.ndarray,
    alphas=TAKAGI2023.alphas,
    cv: int = TAKAGI2023.cv_folds,
    rank: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[LinearMap, RidgeCV]:
    """Standardise ``betas[:, voxels]`` (n, k) on their training statistics, then RidgeCV to targets (n, T)."""
    x = np.ascontiguousarray(betas[:, voxels], dtype=np.float32)
    check_finite("betas", x)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    x = (x - mean) / std
    ridge = RidgeCV(alphas=alphas, cv=cv, device=device).fit(x, targets, groups=groups)
    common = dict(
        voxels=torch.as_tensor(voxels, dtype=torch.int64),
        ijk=torch.as_tensor(ijk, dtype=torch.int32),
        mean=torch.from_numpy(mean),
        std=torch.from_numpy(std),
        intercept=ridge.intercept_.float(),
        best_alphas=ridge.best_alphas_.float(),
    )
    if rank is None or rank >= min(ridge.coef_.shape):
        return LinearMap(weight=ridge.coef_.float(), **common), ridge
    compute = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x_t = torch.from_numpy(x).to(compute)
    x_t = x_t - x_t.mean(0)  # the ridge fit centres X; so does the Gram of the predictions it must preserve
    left, right = reduced_rank(ridge.coef_.to(compute), x_t.T @ x_t, rank)
    return LinearMap(left=left.cpu(), right=right.cpu(), **common), ridge


# --- the subject's maps --------------------------------------------------------------------------------------


class SubjectMaps:
    """The z map (from ``early`` voxels) and c map (from ``ventral`` voxels) of one subject, and how they scored.

    Use :func:`fit_subject_maps` to make one, :meth:`from_pretrained` to load one, :meth:`predict` to decode.
    """

    def __init__(self, z: LinearMap, c: LinearMap, config: dict):
        self.z = z
        self.c = c
        self.config = config

    # the config's main fields, for readers
    @property
    def subject(self) -> int:
        return int(self.config["subject"])

    @property
    def model_id(self) -> str:
        return self.config["model_id"]

    @property
    def z_shape(self) -> tuple[int, ...]:
        return tuple(self.config["z_shape"])

    @property
    def c_shape(self) -> tuple[int, ...]:
        return tuple(self.config["c_shape"])

    def check_voxels(self, voxels: VoxelTable) -> None:
        """Raise unless ``voxels`` is the voxel table these maps were fitted on."""
        if voxels.subject != self.subject or voxel_fingerprint(voxels) != self.config["voxel_fingerprint"]:
            raise InputError(
                f"these maps were fitted on subject {self.subject}'s voxel table ({self.config['n_voxels']} voxels, "
                f"fingerprint {self.config['voxel_fingerprint']}), but the betas come from subject {voxels.subject}'s "
                f"({len(voxels)} voxels, fingerprint {voxel_fingerprint(voxels)}); use the maps of that subject"
            )

    @torch.no_grad()
    def predict(self, betas, voxels: VoxelTable | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """betas (n, n_voxels) over the subject's voxel table -> z (n, *z_shape), c (n, *c_shape), float32.

        Pass the betas' ``voxels`` table to check it is the one the maps were fitted on.
        """
        if voxels is not None:
            self.check_voxels(voxels)
        betas = torch.as_tensor(np.asarray(betas) if not torch.is_tensor(betas) else betas, dtype=torch.float32)
        if betas.ndim == 1:
            betas = betas[None]
        if betas.ndim != 2 or betas.shape[1] != self.config["n_voxels"]:
            raise InputError(
                f"betas have shape {tuple(betas.shape)}, but subject {self.subject}'s maps expect (n, "
                f"{self.config['n_voxels']}) over their voxel table; are these betas from another subject or dataset?"
            )
        check_finite("betas", betas)
        if device is not None:
            betas = betas.to(device)
        z = self.z.predict(betas).reshape(len(betas), *self.z_shape)
        c = self.c.predict(betas).reshape(len(betas), *self.c_shape)
        return z, c

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weights (both maps, in the storage dtype)."""
        itemsize = torch.finfo(STORAGE_DTYPES[self.config["storage_dtype"]]).bits // 8
        return (self.z.n_weights + self.c.n_weights) * itemsize

    # --- the three doors ---

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``maps.safetensors``, ``config.json`` and ``README.md`` into ``folder`` (atomically)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        staging.chmod(0o755)  # mkdtemp makes it private; the maps are meant to be shared
        try:
            dtype = STORAGE_DTYPES[self.config["storage_dtype"]]
            tensors = {**self.z.tensors("z", dtype), **self.c.tensors("c", dtype)}
            metadata = {"format": FORMAT, "config": json.dumps(self.config)}
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata=metadata)
            (staging / WEIGHTS_FILE).chmod(0o644)
            (staging / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
            self.model_card().save(staging / "README.md")
            if folder.exists():
                for name in (WEIGHTS_FILE, CONFIG_FILE, "README.md"):
                    (staging / name).replace(folder / name)
                staging.rmdir()
            else:
                staging.rename(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | Path,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | None = None,
    ) -> SubjectMaps:
        """Load from a local folder or a Hub model repo (through the Hugging Face cache; works offline once cached)."""
        local = Path(repo_id_or_dir)
        if local.is_dir():
            path = local / WEIGHTS_FILE
            if not path.is_file():
                raise InputError(f"{local} has no {WEIGHTS_FILE}; is it a folder written by scripts/fit_maps.py?")
        else:
            try:
                path = hf_hub_download(
                    str(repo_id_or_dir), WEIGHTS_FILE, revision=revision, cache_dir=cache_dir, token=token
                )
            except Exception as err:
                raise InputError(
                    f"could not get {WEIGHTS_FILE} from {repo_id_or_dir!r}: it is not a local folder, and the Hub "
                    f"download failed ({err.__class__.__name__}: {oneline(err)}). With HF_HUB_OFFLINE=1 the maps "
                    "must already be in the Hugging Face cache."
                ) from err
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> SubjectMaps:
        """Load a ``maps.safetensors`` file."""
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
        config = json.loads(metadata["config"])
        z, c = LinearMap.from_tensors(tensors, "z"), LinearMap.from_tensors(tensors, "c")
        for m in (z, c):  # decode in float32 whatever the storage dtype
            for name in ("weight", "left", "right"):
                if getattr(m, name) is not None:
                    setattr(m, name, getattr(m, name).float())
        return cls(z, c, config)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload the folder form of these maps to a Hub model repo; returns the commit's URL."""
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "maps")
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=str(Path(tmp) / "maps"), commit_message="Upload maps"
            )
        return commit.commit_url

    def model_card(self) -> ModelCard:
        cfg = self.config
        datasets = [cfg["data"]] if cfg.get("data", "(local)") != "(local)" else []
        data = ModelCardData(
            library_name="brainldm",
            base_model=cfg["model_id"] if cfg["model_id"] not in ("tiny", "random-sd14") else None,
            datasets=datasets or None,
            license="other",
            tags=["fmri", "neuroscience", "brain-decoding", "natural-scenes-dataset", "stable-diffusion"],
            metrics=["pearsonr", "accuracy"],
            pipeline_tag="image-to-image",
        )
        scores = cfg.get("scores", {})
        rows = "\n".join(
            f"| {name} | {s['dimension_r']:.3f} | {s['pattern_r']:.3f} | {100 * s['identification']:.1f}% |"
            for name, s in scores.items()
        )
        z_shape, c_shape = (" x ".join(map(str, cfg[f"{k}_shape"])) for k in "zc")
        content = f"""---
{data.to_yaml()}
---

# brainldm subject maps: NSD subject {cfg["subject"]}

Linear maps from fMRI betas to the latent diffusion model `{cfg["model_id"]}`, fitted with brainldm
(`scripts/fit_maps.py`) following Takagi & Nishimoto (CVPR 2023):
- **z** ({z_shape}, the image latent) from {cfg["z_roi"]} voxels ({cfg["n_z_voxels"]});
- **c** ({c_shape}, the caption embedding) from {cfg["c_roi"]} voxels ({cfg["n_c_voxels"]}).

Ridge regression, alpha per target by grouped {cfg["cv"]}-fold CV over {len(cfg["alphas"])} alphas; voxels
standardised on the training trials ({cfg["n_train"]} single trials). Storage: {cfg["storage_dtype"]}, c map rank
{cfg.get("c_rank") or "full"}, z map rank {cfg.get("z_rank") or "full"}.

## Test scores ({cfg.get("n_test", "?")} shared images, betas averaged over repetitions)

| feature | mean r per dimension | mean r per image | 2-way identification |
|---|---|---|---|
{rows}

## Usage

```python
from brainldm.maps import SubjectMaps
from brainldm.data import load_trials, load_voxels

maps = SubjectMaps.from_pretrained("REPO_ID")
test = load_trials("NSD_DATASET", subject={cfg["subject"]}, split="test").with_format("numpy")
z, c = maps.predict(test["betas"][:4], voxels=load_voxels("NSD_DATASET", {cfg["subject"]}))
```

Data: the Natural Scenes Dataset (naturalscenesdataset.org), under the NSD Terms and Conditions.
"""
        return ModelCard(content)


def fit_subject_maps(
    data: str | Path,
    features: str | Path,
    subject: int,
    alphas=TAKAGI2023.alphas,
    cv: int = TAKAGI2023.cv_folds,
    z_rank: int | None = None,
    c_rank: int | None = None,
    storage_dtype: str = "float32",
    model_id: str | None = None,
    device: str | torch.device | None = None,
) -> SubjectMaps:
    """Fit z (early voxels) and c (ventral voxels) maps on the train split; score them on the test split.

    Args:
        data: the prepared trials dataset (local folder or Hub repo id).
        features: the feature folder written by ``scripts/extract_features.py`` (needs ``z`` and ``c``).
        z_rank, c_rank: store that map as a low-rank product (see :func:`reduced_rank`); None keeps it dense.
        storage_dtype: ``float32`` or ``float16`` for the saved weights.
        model_id: the LDM the features came from (default: read from the feature store).
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise InputError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
    voxels = load_voxels(data, subject)
    train = load_trials(data, subject, "train").select_columns(["nsd_id", "betas"]).with_format("numpy")
    test = load_trials(data, subject, "test").select_columns(["nsd_id", "betas"]).with_format("numpy")
    train_ids, test_ids = np.asarray(train["nsd_id"]), np.asarray(test["nsd_id"])
    train_betas, test_betas = np.asarray(train["betas"], dtype=np.float32), np.asarray(test["betas"], dtype=np.float32)
    stores = {name: FeatureStore(features, name) for name in ("z", "c")}
    models = {name: store.config.get("model") for name, store in stores.items()}
    if models["z"] != models["c"]:
        raise InputError(
            f"the z features in {features} came from {models['z']!r} but the c features from {models['c']!r}; "
            "extract both with one model (scripts/extract_features.py --model ...)"
        )
    for name, rank in (("z", z_rank), ("c", c_rank)):
        if rank is not None and rank < 1:
            raise InputError(f"--{name}-rank must be >= 1 (or left out for a dense map), got {rank}")
    if cv < 2:
        raise InputError(f"cv must be >= 2 folds, got {cv}")
    config = {
        "format": FORMAT,
        "brainldm_version": __version__,
        "subject": int(subject),
        "data": "(local)" if Path(data).exists() else str(data),  # a Hub id is public; a local path is not
        "model_id": model_id or stores["z"].config["model"],
        "n_voxels": len(voxels),
        "voxel_fingerprint": voxel_fingerprint(voxels),
        "z_roi": TAKAGI2023.z_roi,
        "c_roi": TAKAGI2023.c_roi,
        "alphas": [float(a) for a in alphas],
        "cv": cv,
        "n_train": len(train_ids),
        "n_test": len(test_ids),
        "storage_dtype": storage_dtype,
        "z_rank": z_rank,
        "c_rank": c_rank,
        "scores": {},
    }
    fitted = {}
    for name, roi, rank in (("z", TAKAGI2023.z_roi, z_rank), ("c", TAKAGI2023.c_roi, c_rank)):
        targets = stores[name].load(train_ids)
        config[f"{name}_shape"] = list(targets.shape[1:])
        selection = voxels.roi(roi)
        if len(selection) == 0:
            raise InputError(f"subject {subject} has no {roi} voxels in its voxel table")
        config[f"n_{name}_voxels"] = len(selection)
        n_dims = int(np.prod(targets.shape[1:]))
        if rank is not None and rank > min(len(selection), n_dims):
            raise InputError(
                f"--{name}-rank {rank} is above what the {name} map can hold: it maps {len(selection)} {roi} voxels to "
                f"{n_dims} dimensions, so its rank is at most {min(len(selection), n_dims)}"
            )
        fitted[name], ridge = fit_linear_map(
            train_betas, targets.reshape(len(targets), -1), selection, voxels.ijk[selection], train_ids,
            alphas=alphas, cv=cv, rank=rank, device=device,
        )  # fmt: skip
        del targets
        config["scores"][name] = {"cv_r": float(ridge.cv_scores_.max(0).values.mean())}
    maps = SubjectMaps(fitted["z"], fitted["c"], config)
    if len(test_ids) >= 2:
        z_pred, c_pred = maps.predict(test_betas, voxels=voxels)
        for name, pred in (("z", z_pred), ("c", c_pred)):
            true = stores[name].load(test_ids)
            config["scores"][name].update(decoding_scores(pred.numpy(), true))
    return maps


def decoding_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Mean per-dimension r, mean per-image pattern r and mean 2-way identification of predicted features."""
    return {
        "dimension_r": float(np.mean(dimension_correlation(pred, true))),
        "pattern_r": float(np.mean(pattern_correlation(pred, true))),
        "identification": float(np.mean(two_way_identification(pred, true))),
    }
