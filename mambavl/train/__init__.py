"""Stage 2: train the MambaVL fusion on a feature cache.

Only cached tensors are touched here (through `mambavl.cache.reader`): frame tokens, question tokens and answer
embeddings were computed once by stage 1, so an epoch over EK-100 costs seconds to minutes on one GPU.

Objectives (alternating, as in the paper):

* recognition steps — cross-entropy with label smoothing on the verb, noun and action heads. The action vocabulary
  is the set of (verb, noun) pairs seen in the *training* cache labels (EK-100 convention); it is stored in the
  checkpoint, and segments whose pair is not in it are ignored by the action-head loss and metric.
* QA steps — one after every `qa_every` recognition steps, on the same batch, weighted by `qa_weight`
  (`qa_weight=0` runs none: the no-QA ablation). Each QA step asks one kind of template question for the whole batch
  (verb / noun / scene; for anticipation next_verb / next_noun), fuses the video with it, maps the fused vector into
  the text space (`model.qa_embed`) and scores the answer candidates of the cache's AnswerBank (`model.qa_logits`):
  cross-entropy for verb/noun answers, multi-label BCE over nouns for the scene question (targets = all nouns of the
  segment). QA targets come from training annotations only.

Question protocol (`question_source`, recorded in the checkpoint and in every metrics row):

* ``templates`` (default) — label-free template questions: the verb head reads a `verb`-kind question, the noun head a
  `noun`-kind one (`next_verb` / `next_noun` for anticipation). Training draws one paraphrase uniformly per sample;
  evaluation always uses paraphrase 0, the fixed evaluation phrasing.
* ``annotation`` — the paper's narration-derived questions (other label masked), `questions/per_segment/annotation`.
* ``file`` — user-supplied questions, `questions/per_segment/file`.
  Rows without a question of the chosen source fall back to the evaluation template and are counted
  (`question_fallbacks` in the metrics).

Reproducibility: every random draw of an epoch (order, frames, paraphrases, QA kinds, dropout) comes from seeds
derived from (seed, epoch, stream, rank), and the checkpoint carries optimizer, scheduler and RNG states, so a run that
is stopped after k epochs and resumed ends with exactly the weights of an uninterrupted run (bitwise on CPU).

Distributed: launched under torchrun (WORLD_SIZE > 1), W processes take one step per *global* batch of
batch_size x W rows of the seeded permutation, each process a contiguous part of it (`batch_size` is per process).
Frames, paraphrases and QA kinds are drawn for the whole global batch from one stream seeded alike on every rank, and
each rank's loss is its share of the global batch's mean (sum over its rows / the global count x W), so the gradient
DistributedDataParallel averages is the gradient one process with the global batch would take, the last, shorter
batch included: the runs agree up to float rounding (tests/test_ddp.py; dropout masks are drawn per rank, so with
dropout they agree in distribution only). Validation scores each rank's part of the split and gathers the parts
(the whole split, once); epoch losses add the ranks' shares and question-fallback counts are summed. Rank 0 writes
checkpoints (atomically) and logs; every rank loads the checkpoint on resume.
"""

from mambavl.runtime import TrainConfig
from mambavl.train.distributed import EpochStats, ProcessLayout, StepPart, global_batches
from mambavl.train.loop import TrainResult, qa_step, question_warning, recognition_step, train, validate
from mambavl.train.objective import Objective, RecognitionLoss, qa_loss_share, recognition_loss
from mambavl.train.schedule import MIN_BATCH, NonFiniteLoss, Optimizer, StepPlan, lr_factor, param_groups, plan_steps
from mambavl.train.selfq import candidate_recall, cross_fit_candidates
from mambavl.train.state import Checkpointer, resume_point

__all__ = [
    "MIN_BATCH", "Checkpointer", "EpochStats", "NonFiniteLoss", "Objective", "Optimizer", "ProcessLayout",
    "RecognitionLoss", "StepPart", "StepPlan", "TrainConfig", "TrainResult", "candidate_recall", "cross_fit_candidates",
    "global_batches", "lr_factor", "param_groups", "plan_steps", "qa_loss_share", "qa_step", "question_warning",
    "recognition_loss", "recognition_step", "resume_point", "train", "validate",
]  # fmt: skip
