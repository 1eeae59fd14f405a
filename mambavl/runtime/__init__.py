"""Model runtime shared by training, evaluation, prediction and analysis.

The layer between the fusion model (`mambavl.fuse`) and the stages that run it: the task spec (`TaskSpec`: the
questions, window and QA kinds of a task), the run configuration (`TrainConfig`), the trained run as a typed
artifact (`TrainedModel`: config, vocabularies, feature spec and weights, with one `save` and one `load`), building
a model, what the model is asked (`Asker`) and scoring clips (`ClipBatch`, `present`, `head_logits`, `qa_logits`,
`predict_scores`) and the validation metrics. `mambavl.train` builds on it; `mambavl.evaluate`, `mambavl.predict`
and `mambavl.analysis` import it and never `mambavl.train`.
"""

from mambavl.runtime.artifact import (
    FORMAT, KIND, RESUME_FIELDS, RunProgress, TrainedModel, TrainingState, Vocabulary, same_run,
)
from mambavl.runtime.build import DATA_FIELDS, build_model, cache_dims, question_tokens
from mambavl.runtime.candidates import FirstPass, candidate_questions, fold_ids, topk_candidates
from mambavl.runtime.config import RunLogger, TrainConfig, plain
from mambavl.runtime.questions import (
    AnswerTables,
    Asker,
    Labels,
    action_answers,
    action_vocab,
    labelled_rows,
    load_labels,
    require_window,
)
from mambavl.runtime.scoring import (
    ClipBatch,
    batches,
    cache_candidates,
    clip_batches,
    first_pass_probs,
    head_logits,
    average_views,
    loader,
    predict_scores,
    present,
    qa_logits,
    validation_metrics,
    view_protocol,
)
from mambavl.runtime.task import TASKS, Task, TaskSpec, spec_of_window, task_spec

__all__ = [
    "DATA_FIELDS", "FORMAT", "KIND", "RESUME_FIELDS", "TASKS",
    "AnswerTables", "Asker", "ClipBatch", "FirstPass", "Labels",
    "RunLogger", "RunProgress", "Task", "TaskSpec", "TrainConfig", "TrainedModel", "TrainingState", "Vocabulary",
    "action_answers", "action_vocab", "batches", "build_model", "cache_candidates", "cache_dims", "candidate_questions",
    "clip_batches",
    "first_pass_probs", "fold_ids", "head_logits", "labelled_rows", "load_labels", "loader", "plain",
    "predict_scores", "present", "qa_logits", "question_tokens", "require_window", "same_run", "spec_of_window",
    "task_spec", "topk_candidates", "validation_metrics", "average_views", "view_protocol",
]  # fmt: skip
