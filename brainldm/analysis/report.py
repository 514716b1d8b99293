"""The metrics table and its plot: what :func:`~brainldm.analysis.evaluate.evaluate` found, beside the published rows,
as Markdown, a figure and JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from brainldm.analysis.protocol import METRICS, PROTOCOLS, REFERENCE_ROWS
from brainldm.analysis.viz import save_figure


def _format(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if METRICS[name].kind == "identification" else f"{value:.3f}"


def metrics_table(results: dict, names: Sequence[str] = tuple(METRICS)) -> str:
    """A markdown table laid out like the published ones, with the quoted reference rows at the bottom."""
    stand_ins = results.get("stand_ins", {})

    def title(n: str) -> str:
        return f"{METRICS[n].title}{'*' if n in stand_ins else ''} {'↑' if METRICS[n].higher_is_better else '↓'}"

    header = "| Method | " + " | ".join(title(n) for n in names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    for subject, rows in results["subjects"].items():
        for row, scores in rows.items():
            lines.append(f"| {subject} {row} | " + " | ".join(_format(n, scores.get(n)) for n in names) + " |")
    if len(results["subjects"]) > 1:
        for row, scores in results["average"].items():
            lines.append(f"| **average** {row} | " + " | ".join(_format(n, scores.get(n)) for n in names) + " |")
    for label, published in REFERENCE_ROWS.items():
        cells = " | ".join(_format(n, published.scores.get(n)) for n in names)
        lines.append(f"| *{label} ({published.source}), {published.n_test_images} images* | {cells} |")
    text = "\n".join(lines)
    for name, what in stand_ins.items():
        text += f"\n\n\\* {METRICS[name].title} here is computed with {what}."
    if results["unavailable"]:
        text += "\n\nUnavailable metrics (their models could not be loaded):\n" + "\n".join(
            f"- {METRICS[n].title}: {reason}" for n, reason in results["unavailable"].items()
        )
    if "protocol" in results:
        text += f"\n\nProtocol: {results['protocol']}, {PROTOCOLS[results['protocol']]}."
    for subject, modes in results.get("rescale", {}).items():
        said = ", ".join("as fitted (no rescaling)" if m == "None" else f"rescaled per {m}" for m in modes)
        text += f"\n\nDecoded targets, {subject}: {said}."
    for subject, sets in results.get("test_sets", {}).items():
        text += f"\n\nTest images, {subject}: " + "; ".join(f"{name}: {n}" for name, n in sets.items()) + "."
    if any(len(sets) > 1 for sets in results.get("test_sets", {}).values()):
        text += (
            " Rows marked with a first-sessions set score only the images shown in those sessions, with betas averaged"
            " over every repetition the data hold; for the paper's own averaging, prepare with that many --sessions."
        )
    text += (
        "\n\nRows in italics are published figures quoted for comparison, each from the table named, not computed "
        "here; the number of test images says which test set they used (982: the first 37 sessions; 1000: all 40)."
    )
    return text


def metrics_plot(results: dict, path: str | Path) -> Path:
    """One panel per metric: the subject-averaged value of each row; chance (50%) drawn for identification."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["average"]
    names = [n for n in METRICS if any(n in scores for scores in rows.values())]
    figure, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        labels = [row for row in rows if name in rows[row]]
        ax.bar(range(len(labels)), [rows[row][name] for row in labels], color="tab:blue")
        ax.set_xticks(range(len(labels)), [row.split(",")[0] + ("*" if "," in row else "") for row in labels])
        ax.set_title(METRICS[name].title, fontsize=9)
        if METRICS[name].chance is not None:
            ax.axhline(METRICS[name].chance, color="gray", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1)
    figure.suptitle("reconstruction metrics (average over subjects; * = mean over samples)", fontsize=9)
    return save_figure(figure, path)


def write_report(results: dict, out: str | Path, names: Sequence[str] = tuple(METRICS)) -> dict[str, Path]:
    """metrics.json, metrics.md and metrics.png in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    (out / "metrics.md").write_text(metrics_table(results, names) + "\n")
    return {
        "json": out / "metrics.json",
        "table": out / "metrics.md",
        "plot": metrics_plot(results, out / "metrics.png"),
    }
