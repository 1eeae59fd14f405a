"""Model runtime shared by training, evaluation, prediction and analysis.

The layer between the fusion model (`mambavl.fuse`) and the stages that run it: the run configuration
(`TrainConfig`, `Task`, the question kinds of each head), building a model from it, checkpoints (config and
vocabularies travel with the weights; loaded with `weights_only=True`), questions and labels of a cache, scoring a
cache (`predict_scores`) and the validation metrics. `mambavl.train` builds on it; `mambavl.evaluate`,
`mambavl.predict` and `mambavl.analysis` import it and never `mambavl.train`.
"""

from mambavl.runtime.candidates import FirstPass, candidate_questions, fold_ids, topk_candidates
from mambavl.runtime.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_KIND,
    DATA_FIELDS,
    atomic_copy,
    atomic_torch_save,
    build_model,
    config_from_checkpoint,
    load_checkpoint,
    question_tokens,
)
from mambavl.runtime.config import (
    HEAD_KINDS,
    QA_KINDS,
    QA_TARGET,
    SAMPLING_ATTRS,
    Task,
    TrainConfig,
    plain,
    window_of,
)
from mambavl.runtime.questions import (
    Labels,
    Questions,
    action_answers,
    action_vocab,
    labelled_rows,
    load_labels,
    require_window,
)
from mambavl.runtime.scoring import (
    batches,
    cache_candidates,
    first_pass_probs,
    loader,
    predict_logits,
    predict_scores,
    qa_scores,
    validation_metrics,
)

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_KIND", "DATA_FIELDS", "HEAD_KINDS", "QA_KINDS", "QA_TARGET", "SAMPLING_ATTRS",
    "FirstPass", "Labels", "Questions", "Task", "TrainConfig", "action_answers", "action_vocab", "atomic_copy",
    "atomic_torch_save", "batches", "build_model", "cache_candidates", "candidate_questions", "config_from_checkpoint",
    "first_pass_probs", "fold_ids", "labelled_rows", "load_checkpoint", "load_labels", "loader", "plain",
    "predict_logits", "predict_scores", "qa_scores", "question_tokens", "require_window", "topk_candidates",
    "validation_metrics", "window_of",
]  # fmt: skip
