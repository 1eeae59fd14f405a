"""Early stopping on the validation selection metric: pure functions over the run's history, so a resumed run (or a
resumed run with another patience) decides exactly as an uninterrupted one would."""

from __future__ import annotations

import math


def epochs_without_improvement(values: list[float | None], min_delta: float) -> int:
    """Epochs since the metric last rose by more than `min_delta` above the best value before it (NaN or None:
    no improvement). The reference moves only on such a rise, so slow creeping by less than `min_delta` per epoch
    still counts as no improvement (the Keras / Lightning convention)."""
    ref: float | None = None
    wait = 0
    for v in values:
        if v is not None and not math.isnan(float(v)) and (ref is None or float(v) > ref + min_delta):
            ref, wait = float(v), 0
        else:
            wait += 1
    return wait


def early_stop(history: list[dict], metric: str, patience: int, min_delta: float) -> dict | None:
    """None while the run should go on, else the record of its early stop: the epoch it stops after, the best
    epoch, the metric, patience and min_delta. Off (None) with `patience` 0 or without validation metrics."""
    values = [row.get(metric) for row in history]
    if patience <= 0 or not history or all(v is None for v in values):
        return None
    wait = epochs_without_improvement(values, min_delta)
    if wait < patience:
        return None
    finite = [(float(v), i) for i, v in enumerate(values) if v is not None and not math.isnan(float(v))]
    best_epoch = max(finite, key=lambda x: (x[0], -x[1]))[1] + 1 if finite else None
    return {"epoch": int(history[-1].get("epoch", len(history))), "best_epoch": best_epoch, "metric": metric,
            "patience": int(patience), "min_delta": float(min_delta), "epochs_without_improvement": wait}
