"""VoxelTable: a subject's stored voxels, where they sit in the functional grid and which ROIs they belong to.

ROI labels are data, not constants: each table carries ``roi_names`` (label -> name) beside its per-voxel labels,
so NSD's ``streams`` (early, midventral, ..., ventral) and a user's own ROI masks go through the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from brainldm.data.nsd import STREAMS as NSD_STREAMS
from brainldm.validation import InputError


@dataclass
class VoxelTable:
    """A subject's stored voxels. ``ijk`` (n_voxels, 3) indexes the X, Y, Z axes of the betas grid.

    ``nsdgeneral``: the visual-cortex mask (NSD's ``nsdgeneral``; for another dataset, the union of its ROIs).
    ``streams``: each voxel's ROI label (0: in no ROI), named by ``roi_names``.
    """

    subject: int
    ijk: np.ndarray
    grid_shape: tuple[int, int, int]
    affine: np.ndarray
    nsdgeneral: np.ndarray  # (n_voxels,) bool
    streams: np.ndarray  # (n_voxels,) int labels, see roi_names
    roi_names: dict[int, str] = field(default_factory=lambda: dict(NSD_STREAMS))

    def __len__(self) -> int:
        return len(self.ijk)

    def roi(self, name: str) -> np.ndarray:
        """Indices of the voxels in a ROI (``"early"``, ``"ventral"``, ...), in ``"nsdgeneral"``, or in a union of
        ROIs written with ``+`` (``"early+ventral+parietal"``), in voxel-table order."""
        if "+" in name:
            return np.unique(np.concatenate([self.roi(part) for part in name.split("+")]))
        if name == "nsdgeneral":
            return np.flatnonzero(self.nsdgeneral)
        ids = {roi: label for label, roi in self.roi_names.items()}
        if name not in ids:
            raise InputError(f"unknown ROI {name!r}; this voxel table has 'nsdgeneral' and {sorted(ids)}")
        return np.flatnonzero(self.streams == ids[name])

    def to_volume(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Scatter per-voxel ``values`` (n_voxels,) into the grid -> (X, Y, Z) float32."""
        volume = np.full(self.grid_shape, fill, dtype=np.float32)
        volume[tuple(self.ijk.T)] = values
        return volume

    def save(self, path: str | Path) -> None:
        tensors = {
            "ijk": np.ascontiguousarray(self.ijk, dtype=np.int32),
            "affine": np.ascontiguousarray(self.affine, dtype=np.float64),
            "nsdgeneral": self.nsdgeneral.astype(np.uint8),
            "streams": self.streams.astype(np.int16),
        }
        metadata = {
            "subject": str(self.subject),
            "grid_shape": json.dumps(list(self.grid_shape)),
            "roi_names": json.dumps({str(k): v for k, v in self.roi_names.items()}),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> VoxelTable:
        try:
            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata()
            tensors = load_file(str(path))
            names = json.loads(metadata["roi_names"]) if "roi_names" in metadata else NSD_STREAMS  # older tables: NSD
            return cls(
                subject=int(metadata["subject"]),
                ijk=tensors["ijk"].astype(np.int64),
                grid_shape=tuple(json.loads(metadata["grid_shape"])),
                affine=tensors["affine"],
                nsdgeneral=tensors["nsdgeneral"].astype(bool),
                streams=tensors["streams"].astype(np.int64),
                roi_names={int(k): v for k, v in names.items()},
            )
        except Exception as err:
            raise InputError(f"could not read the voxel table {path}: {err}") from err
