"""Linear probes on the cached frame features: the baseline a frozen-feature fusion model has to beat.

A probe sees the same frame tokens as the fusion model at evaluation — the centre frame of each of K equal bins of
the segment (`mambavl.data.sampling.eval_frame_indices`, K = `frames`) — in one of two forms (`ProbeInput`):

| input | features per clip | what it can use |
| --- | --- | --- |
| `concat` | the K frame tokens in temporal order, concatenated (K * D) | appearance and order (motion) |
| `mean` | the mean of the K frame tokens (D) | appearance only: blind to the order of frames |

Each head (verb; noun when the cache has nouns) is a multinomial logistic regression (scikit-learn, L-BFGS, L2
penalty `C`) on inputs standardised with the training set's mean and standard deviation. The probe's class scores
go through the same validation metrics as a trained model (`mambavl.runtime.validation_metrics`: top-1/top-5 of
verb and noun, action = verb and noun both right), so its numbers sit in the same table. Probes are deterministic:
every seed of an ablation gives the same result.

    result = run_probe(ProbeConfig(train_cache="train.h5", val_cache="val.h5", input="concat", frames=8))
    result["metrics"]["val_verb_top1"]    # percent
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from mambavl.cache.dataset import SegmentDataset
from mambavl.cache.reader import CacheFile, open_cache, releases_caches
from mambavl.cache.schema import RECOGNITION, check_compatible
from mambavl.data.sampling import subsample
from mambavl.errors import InputError
from mambavl.runtime import labelled_rows, load_labels, validation_metrics


class ProbeInput(str, Enum):
    CONCAT = "concat"
    MEAN = "mean"


@dataclass
class ProbeConfig:
    """One probe: caches, input form, frame tokens per clip (K, 0 = all cached), inverse L2 strength `C`."""

    train_cache: str
    val_cache: str
    input: ProbeInput = ProbeInput.CONCAT
    frames: int = 8
    C: float = 1.0
    max_iter: int = 2000

    def __post_init__(self) -> None:
        self.train_cache, self.val_cache = str(self.train_cache), str(self.val_cache)
        try:
            self.input = ProbeInput(self.input)
        except ValueError:
            raise InputError(f"probe: input {self.input!r} is not one of {[p.value for p in ProbeInput]}") from None
        if self.frames < 0 or self.C <= 0 or self.max_iter < 1:
            raise InputError(f"probe: need frames >= 0, C > 0, max_iter >= 1 (got {self.frames}, {self.C}, "
                             f"{self.max_iter})")


def probe_features(cache: CacheFile, rows: np.ndarray, frames: int, form: ProbeInput) -> np.ndarray:
    """Probe inputs of cache `rows` (recognition window): (N, K*D) float32 for `concat`, (N, D) for `mean`, from the
    evaluation frames (centre of each of K bins; rows with fewer valid frames than K: the missing slots are zeros
    for `concat` and left out of the `mean`)."""
    dataset = SegmentDataset(cache, window=RECOGNITION, indices=rows)
    items = [dataset[i] for i in range(len(dataset))]
    feats = torch.stack([it["features"] for it in items])  # (N, F, D)
    num = torch.stack([it["num_frames"] for it in items])  # (N,)
    video, mask = subsample(feats, num, frames, train=False)  # (N, K, D), (N, K)
    video = video * mask[..., None].to(video.dtype)
    if ProbeInput(form) == ProbeInput.CONCAT:
        return video.reshape(len(video), -1).numpy()
    return (video.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).numpy()


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, classes: int, cfg: ProbeConfig
                 ) -> np.ndarray:
    """Logistic regression on standardised inputs -> (N_val, classes) log-probabilities; classes absent from the
    training labels get -inf (never predicted)."""
    # Imported here: scikit-learn takes 0.7-1 s to import, and this module is on the import path of `mambavl --help`
    # (through `ablate`; docs/architecture.md lists the exceptions to imports at the top).
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = y_train >= 0
    seen = np.unique(y_train[keep])
    out = np.full((len(x_val), classes), -np.inf, dtype=np.float32)
    if len(seen) == 1:  # one class in training: it is the only possible answer
        out[:, seen[0]] = 0.0
        return out
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=cfg.max_iter))
    with warnings.catch_warnings():
        # Tiny training sets are often separable; L-BFGS then stops at max_iter with a usable solution.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train[keep], y_train[keep])
    out[:, clf.classes_] = clf.predict_log_proba(x_val)
    return out


@releases_caches
def run_probe(cfg: ProbeConfig) -> dict:
    """Fit the probe on the training cache, score the validation cache.

    Returns dict(metrics {val_verb_top1, val_verb_top5, [val_noun_top1, ...]} in percent, params (weights and
    biases of the linear heads), train_time_s, input, frames). InputError for a missing or incompatible cache.
    """
    t0 = time.perf_counter()
    train_cache, val_cache = open_cache(cfg.train_cache), open_cache(cfg.val_cache)
    check_compatible(train_cache.attrs, val_cache.attrs, f"train cache {train_cache.path}",
                     f"val cache {val_cache.path}")
    if list(val_cache.verb_keys) != list(train_cache.verb_keys) or list(val_cache.noun_keys) != list(
            train_cache.noun_keys):
        raise InputError(f"val cache {val_cache.path} has other verb/noun classes than train cache {train_cache.path}")
    train_rows = labelled_rows(train_cache, RECOGNITION, "train")
    val_rows = labelled_rows(val_cache, RECOGNITION, "val")
    x_train = probe_features(train_cache, train_rows, cfg.frames, cfg.input)
    x_val = probe_features(val_cache, val_rows, cfg.frames, cfg.input)
    train_labels, val_labels = load_labels(train_cache, {}), load_labels(val_cache, {})
    heads = {"verb": len(train_cache.verb_keys)}
    if len(train_cache.noun_keys):
        heads["noun"] = len(train_cache.noun_keys)
    scores: dict[str, torch.Tensor] = {"indices": torch.as_tensor(val_rows)}
    params = 0
    for head, classes in heads.items():
        y = getattr(train_labels, head)[torch.as_tensor(train_rows)].numpy()
        scores[head] = torch.as_tensor(_fit_predict(x_train, y, x_val, classes, cfg))
        params += (x_train.shape[1] + 1) * classes
    return {"metrics": validation_metrics(scores, val_labels), "params": params,
            "train_time_s": time.perf_counter() - t0, "input": cfg.input.value, "frames": cfg.frames}
