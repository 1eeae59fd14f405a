"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed).

Each function takes plain arrays (from `mambavl.metrics`) and a path, writes one PNG and returns the path. The
backend is chosen on the figure itself (`FigureCanvasAgg`), never with the global `matplotlib.use`, so importing this
module does not change plotting for the rest of a user's process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch


def _figure(width: float, height: float):
    # A Figure with its own Agg canvas: no pyplot state, no GUI backend, safe in worker processes and CI.
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    os.replace(tmp, path)
    return path


def per_class_accuracy_plot(
    path: str | os.PathLike,
    accuracy: np.ndarray,
    train_counts: np.ndarray,
    names: Sequence[str],
    title: str,
    buckets: np.ndarray | None = None,
    max_labels: int = 60,
) -> Path:
    """Bar chart of per-class top-1 accuracy (%), classes sorted by descending training frequency.

    accuracy (C,) in percent, NaN for classes absent from the evaluated split (drawn as gaps); train_counts (C,)
    drawn as a line on a log-scaled second axis; buckets (C,) "head"/"mid"/"tail" colour the bars. Class names are
    written on the x axis when there are at most `max_labels` classes.
    """
    accuracy = np.asarray(accuracy, dtype=np.float64)
    counts = np.asarray(train_counts, dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    c = len(order)
    fig = _figure(max(6.0, min(24.0, 0.12 * c + 4)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"head": "#1f77b4", "mid": "#ff7f0e", "tail": "#d62728"}
    if buckets is not None:
        bar_colours = [colours.get(str(buckets[i]), "#7f7f7f") for i in order]
    else:
        bar_colours = ["#1f77b4"] * c
    ax.bar(np.arange(c), np.nan_to_num(accuracy[order], nan=0.0), color=bar_colours, width=0.85)
    ax.set_ylim(0, 100)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xlabel("class, most frequent in training first")
    ax.set_title(title)
    if c <= max_labels:
        ax.set_xticks(np.arange(c))
        ax.set_xticklabels([names[i] for i in order], rotation=90, fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(np.arange(c), np.maximum(counts[order], 0.5), color="black", linewidth=1.0)
    ax2.set_yscale("log")
    ax2.set_ylabel("training segments (log)")
    if buckets is not None:
        ax.legend(handles=[Patch(color=v, label=k) for k, v in colours.items()], loc="upper right", fontsize=8)
    return _save(fig, path)


def bucket_bars_plot(path: str | os.PathLike, results: Mapping[str, Mapping[str, Mapping]], title: str) -> Path:
    """Grouped bars of top-1 accuracy (%) per frequency bucket, one group per task.

    results: {task: {bucket: {"n": int, "top1": percent, ...}}} (as `metrics.bucket_accuracy`, scaled to percent).
    """
    tasks = list(results)
    buckets = ["head", "mid", "tail"]
    fig = _figure(1.8 * max(1, len(tasks)) + 2.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(buckets)
    colours = {"head": "#1f77b4", "mid": "#ff7f0e", "tail": "#d62728"}
    for j, bucket in enumerate(buckets):
        vals = [results[t].get(bucket, {}).get("top1", np.nan) for t in tasks]
        ns = [results[t].get(bucket, {}).get("n", 0) for t in tasks]
        x = np.arange(len(tasks)) + (j - 1) * width
        bars = ax.bar(x, np.nan_to_num(np.asarray(vals, dtype=np.float64), nan=0.0), width, label=bucket,
                      color=colours[bucket])
        for bar, n in zip(bars, ns):
            ax.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylim(0, 105)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def confusion_plot(path: str | os.PathLike, matrix: np.ndarray, names: Sequence[str], title: str) -> Path:
    """Row-normalised confusion matrix (rows = true class, columns = predicted) of a few classes, as an image.

    matrix (K, K) counts; names (K,). Rows with no segment stay empty.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    k = matrix.shape[0]
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = max(4.0, min(14.0, 0.35 * k + 2))
    fig = _figure(size + 1, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(np.arange(k))
    ax.set_yticks(np.arange(k))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def training_curves_plot(path: str | os.PathLike, history: Sequence[Mapping[str, float]]) -> Path:
    """A run's curves per epoch: training losses (left) and validation top-1 accuracies in percent (right).

    history: a run's metrics rows (`metrics.csv`), each with "epoch" and any of train_loss, train_loss_qa and
    val_{verb,noun,action}_top1; missing values are left out."""
    fig = _figure(10.0, 3.6)
    panels = ((fig.add_subplot(1, 2, 1), ("train_loss", "train_loss_qa"), "loss"),
              (fig.add_subplot(1, 2, 2), ("val_verb_top1", "val_noun_top1", "val_action_top1"), "validation top-1 (%)"))
    for ax, keys, label in panels:
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history if isinstance(row.get(key), (int, float))]
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)
