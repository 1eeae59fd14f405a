"""Model runtime shared by training, evaluation, prediction and analysis.

The layer between the fusion model (`mambavl.fuse`) and the stages that run it: the task spec (`TaskSpec`: the
questions, window and QA kinds of a task), the run configuration (`TrainConfig`), the trained run as a typed
artifact (`TrainedModel`: config, vocabularies, feature spec and weights, with one `save` and one `load`), building
a model, what the model is asked (`Asker`) and scoring clips (`ClipBatch`, `present`, `head_logits`, `qa_logits`,
`predict_scores`) and the validation metrics. `mambavl.train` builds on it; `mambavl.evaluate`, `mambavl.predict`
and `mambavl.analysis` import it and never `mambavl.train`.
"""

import lazy_loader

# Attributes are imported from their module on first use (lazy_loader, PEP 562), so that what only needs the run
# configuration or the task spec (a command's --help) does not import torch through the model modules.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "artifact": ["FORMAT", "KIND", "RESUME_FIELDS", "RunProgress", "TrainedModel", "TrainingState", "Vocabulary",
                     "same_run"],
        "build": ["DATA_FIELDS", "build_model", "cache_dims", "feature_statistics", "question_tokens"],
        "candidates": ["FirstPass", "candidate_questions", "fold_ids", "topk_candidates"],
        "config": ["Compile", "RunLogger", "TrainConfig", "plain"],
        "questions": ["AnswerTables", "Asker", "Labels", "action_answers", "action_vocab", "labelled_rows", "load_labels",
                      "require_window"],
        "scoring": ["ClipBatch", "average_views", "batches", "cache_candidates", "clip_batches", "first_pass_probs",
                    "head_logits", "loader", "predict_scores", "present", "qa_logits", "validation_metrics",
                    "view_protocol"],
        "task": ["TASKS", "Task", "TaskSpec", "spec_of_window", "task_spec"],
    },
)
