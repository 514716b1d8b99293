"""Figures: reconstruction contact sheets (and, with the encoding analysis, cortical maps)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def contact_sheet(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | Path,
    column_titles: Sequence[str] = (),
    row_titles: Sequence[str] = (),
    cell_inches: float = 1.6,
) -> Path:
    """A grid of images (rows of H x W x 3 uint8 arrays, ragged rows allowed) saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    figure, axes = plt.subplots(
        n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * n_rows + 0.3), squeeze=False
    )
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(row):
                ax.imshow(row[j])
            if i == 0 and j < len(column_titles):
                ax.set_title(column_titles[j], fontsize=9)
            if j == 0 and i < len(row_titles):
                ax.set_ylabel(row_titles[i], fontsize=8)
    figure.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
