"""Write an evaluation's results: results.json, a markdown table, and two comparison plots."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from models.evaluation.metrics import SLICES, ModelRun, summarize_slices

log = structlog.get_logger(__name__)

#: Metric names in table order; each is reported as NAME@K.
TABLE_METRICS = ("HR", "NDCG", "MRR", "coverage", "diversity", "novelty")
#: Metrics plotted against K, one subplot each.
PLOT_METRICS = ("HR", "NDCG", "MRR", "coverage")


def write_results(
    out_dir: Path,
    *,
    dataset: str,
    protocol: str,
    runs: Sequence[ModelRun],
    ks: Sequence[int],
    catalogue: Sequence[str],
    item_vectors: Mapping[str, np.ndarray] | None,
    popularity: Mapping[str, int],
    settings: Mapping[str, Any] | None = None,
    command: str | None = None,
    sweep: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Summarise every run and write results.json, results.md, metrics_vs_k.png and slices.png;
    with ``sweep`` (run name -> MMR lambda), also tradeoff.png: accuracy against diversity.

    Returns the written paths as ``{"json": path, "md": path, "plots": [paths]}``.
    """
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    ks = list(ks)
    models: dict[str, dict[str, float]] = {}
    slices: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        summary = summarize_slices(
            run, ks, catalogue=catalogue, item_vectors=item_vectors, popularity=popularity
        )
        models[run.name] = {**summary["all"], "seconds": run.seconds}
        slices[run.name] = {name: summary[name] for name in SLICES}
    results = {
        "dataset": dataset,
        "protocol": protocol,
        "ks": ks,
        "command": command,
        "settings": dict(settings) if settings is not None else None,
        "models": models,
        "slices": slices,
        "mmr_sweep": dict(sweep) if sweep else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    md_path = out_dir / "results.md"
    _write_atomic(json_path, json.dumps(results, indent=2, default=str) + "\n")
    _write_atomic(md_path, render_markdown(results))
    plots = [
        _plot_metrics_vs_k(out_dir / "metrics_vs_k.png", models, ks),
        _plot_slices(out_dir / "slices.png", models, slices, ks[0]),
    ]
    if sweep:
        plots.append(_plot_tradeoff(out_dir / "tradeoff.png", models, sweep, ks[0]))
    log.info("results_written", out_dir=str(out_dir), models=len(models), ks=ks)
    return {"json": json_path, "md": md_path, "plots": plots}


def render_markdown(results: Mapping[str, Any]) -> str:
    """The results as markdown: the model table, the slice table, and the command line."""
    ks: list[int] = results["ks"]
    models: dict[str, dict[str, float]] = results["models"]
    slices: dict[str, dict[str, dict[str, float]]] = results["slices"]
    lines = [
        f"# Evaluation: {results['dataset']} ({results['protocol']})",
        "",
        *_model_table(models, ks),
        "",
        f"## Slices (K={ks[0]})",
        "",
        *_slice_table(models, slices, ks[0]),
        "",
        "## Command",
        "",
        f"`{results['command']}`" if results.get("command") else "(not recorded)",
        "",
    ]
    return "\n".join(lines)


def _model_table(models: Mapping[str, Mapping[str, float]], ks: Sequence[int]) -> list[str]:
    """One row per model; a metric column appears when any model has it (diversity@1 never)."""
    columns = [
        f"{metric}@{k}"
        for k in ks
        for metric in TABLE_METRICS
        if any(f"{metric}@{k}" in row for row in models.values())
    ]
    header = ["model", *columns, "targets", "seconds"]
    rows = [
        [
            name,
            *(_cell(row.get(col)) for col in columns),
            str(int(row["targets"])),
            f"{row['seconds']:.1f}",
        ]
        for name, row in models.items()
    ]
    return _table(header, rows)


def _slice_table(
    models: Mapping[str, Mapping[str, float]],
    slices: Mapping[str, Mapping[str, Mapping[str, float]]],
    k: int,
) -> list[str]:
    """HR@K and NDCG@K per model and slice, with each slice's number of targets."""
    header = ["model", "slice", "targets", f"HR@{k}", f"NDCG@{k}"]
    rows = []
    for name, whole in models.items():
        for slice_name, row in {"all": whole, **slices[name]}.items():
            rows.append(
                [
                    name,
                    slice_name,
                    str(int(row["targets"])),
                    _cell(row.get(f"HR@{k}")),
                    _cell(row.get(f"NDCG@{k}")),
                ]
            )
    return _table(header, rows)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _plot_metrics_vs_k(
    path: Path, models: Mapping[str, Mapping[str, float]], ks: Sequence[int]
) -> Path:
    """One subplot per metric, K on the x axis, one line per model."""
    xs = sorted(set(ks))
    with _figure(path, len(PLOT_METRICS), (4 * len(PLOT_METRICS), 3.5)) as axes:
        for ax, metric in zip(axes, PLOT_METRICS, strict=True):
            for name, row in models.items():
                ys = [row.get(f"{metric}@{k}", np.nan) for k in xs]
                ax.plot(xs, ys, marker="o", label=name)
            ax.set_title(f"{metric}@K")
            ax.set_xlabel("K")
            ax.set_xticks(xs)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
    return path


def _plot_slices(
    path: Path,
    models: Mapping[str, Mapping[str, float]],
    slices: Mapping[str, Mapping[str, Mapping[str, float]]],
    k: int,
) -> Path:
    """Grouped bars of HR@K: one group per slice, one bar per model (an empty slice has none)."""
    groups = ["all", *SLICES]
    x = np.arange(len(groups))
    width = 0.8 / max(len(models), 1)
    size = (max(6.0, 1.6 * len(groups) * max(len(models), 1) ** 0.5), 4.0)
    with _figure(path, 1, size) as ax:
        for i, (name, whole) in enumerate(models.items()):
            by_slice = {"all": whole, **slices[name]}
            heights = [by_slice[g].get(f"HR@{k}", np.nan) for g in groups]
            ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=name)
        ax.set_xticks(x)
        ax.set_xticklabels(groups)
        ax.set_ylabel(f"HR@{k}")
        ax.set_title(f"HR@{k} by slice")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    return path


def _plot_tradeoff(
    path: Path, models: Mapping[str, Mapping[str, float]], sweep: Mapping[str, float], k: int
) -> Path:
    """NDCG@K and HR@K against intra-list diversity@K, one point per MMR lambda."""
    runs = sorted(sweep, key=lambda n: sweep[n])
    div = [models[n].get(f"diversity@{k}", np.nan) for n in runs]
    with _figure(path, 1, (6.0, 4.0)) as ax:
        for metric in ("HR", "NDCG"):
            ys = [models[n].get(f"{metric}@{k}", np.nan) for n in runs]
            ax.plot(div, ys, marker="o", label=f"{metric}@{k}")
            for x, y, n in zip(div, ys, runs, strict=True):
                ax.annotate(
                    f"λ={sweep[n]:g}",
                    (x, y),
                    fontsize="x-small",
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xlabel(f"intra-list diversity@{k}")
        ax.set_ylabel("accuracy")
        ax.set_title("accuracy / diversity trade-off (MMR lambda)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return path


@contextmanager
def _figure(path: Path, columns: int, size: tuple[float, float]) -> Iterator[Any]:
    """The axes of a new figure (one row of ``columns``), laid out and saved atomically to
    ``path`` when the block ends without an error, and closed either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=size)
    try:
        yield axes
        fig.tight_layout()
        _save_atomic(fig, path)
    finally:
        plt.close(fig)


def _save_atomic(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
