"""The trained run as one typed artifact: `TrainedModel`, with one `save` and one `load`.

This module is the checkpoint contract, as `mambavl.cache.schema` is the cache's. A checkpoint file (`last.pt`,
`best.pt`) is a `torch.save` of plain types and tensors, loaded with `torch.load(..., weights_only=True)` here and
nowhere else in the package. Format 2 (this version) holds:

| key | type | what |
|---|---|---|
| kind | str | "mambavl-checkpoint" |
| format | int | 2 |
| package_version | str | the mambavl version that wrote it |
| model_config | dict | `ModelConfig.to_dict()`: rebuilds the fusion model |
| train_config | dict | `TrainConfig` as plain values (task and question source included) |
| vocab | dict | verbs [V], nouns [Nn], action_pairs [A x (verb, noun)]: head output i means vocab[...][i] |
| features | dict | `FeatureSpec.to_attrs()`: the encoders and sampling of the training cache |
| cache_schema_version | int | the training cache's schema version |
| annotation | dict | file name and sha256 of the training cache's annotation CSV (provenance, checked on resume) |
| weights | dict[str, Tensor] | the model's state dict |
| action_answers | Tensor (A, Dt) or None | the action QA answers, in the order of vocab["action_pairs"] |
| first_pass | dict or None | self-questioning's first pass (`FirstPass.state()`) |
| train_candidates | Tensor (N, 2, k) or None | the training rows' cross-fitted candidates (-1 outside training rows) |
| candidate_recall | dict[str, float] | candidate recall@k (%) on training and validation rows |
| progress | dict | `RunProgress`: epoch (completed), step, history (one metrics row per epoch), early stop, ... |
| training | dict or None | optimizer, scheduler, scaler and RNG states, to resume (`TrainingState`) |

`mambavl export` writes the same state as a folder in the Hugging Face model layout (config.json holds it with
each tensor replaced by a reference into model.safetensors; `mambavl.runtime.hub`), and `load` reads such a folder
or an ``hf://ORG/NAME`` reference to one as it reads a file.

Migrations (`_migrate`): format 1 — every checkpoint mambavl wrote before this contract, one flat dict with "model",
"cache_attrs", "optimizer" ... at the top — is read and rewritten in memory as format 2. Fields added to format 1
over its life get the value the writing version implied: no `scene_bias` weight (the scene logits had no bias: 0),
no `min_steps` (no step floor: 0), no `patience` (no early stopping: 0; format 2 too), no text-encoder attribute
(the CLIP text tower), no action answers or first pass (none), no `precision` (its `amp` flag: precision auto when
on, fp32 when off; format 2 too). tests/test_artifact.py loads a checkpoint of each generation
(tests/data/checkpoints) and checks its logits against those the writing version computed. A file of a newer format,
or not a mambavl checkpoint, is refused with InputError naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mambavl import __version__
from mambavl.cache import schema
from mambavl.device import resolve_device
from mambavl.errors import InputError
from mambavl.extract.questions import QuestionSource
from mambavl.extract.spec import FeatureSpec
from mambavl.files import atomic_torch_save
from mambavl.fuse.config import ModelConfig
from mambavl.fuse.model import MambaVL, model_config_from_dict
from mambavl.runtime import hub
from mambavl.runtime.candidates import FirstPass
from mambavl.runtime.config import TrainConfig, plain
from mambavl.runtime.task import Task, TaskSpec, task_spec

KIND = "mambavl-checkpoint"
FORMAT = 2

# TrainConfig fields a run may change without changing what it computes: where it writes, how it is resumed and on
# which device, how it compiles its steps, how many loader workers, where its live scalars go, and where its caches
# lie (what the caches hold is checked separately: `TrainedModel.check_cache`).
FREE_FIELDS = ("resume", "device", "compile", "num_workers", "out_dir", "train_cache", "val_cache", "logger")
# ... and the fields a *resumed* run may change besides: its budget of epochs, when it stops early, and the precision
# of its steps. The first three change how long the run goes on, not what a step computes; the precision changes a
# step's rounding, not its model, data or objective, and a run started in bf16 on a GPU must be able to go on in
# fp32 on a CPU. It is not free outside a resume: an ablation run trained in another precision is another run.
# `mambavl.train` records each change in `RunProgress.changes`.
RESUME_FIELDS = ("epochs", "patience", "min_delta", "precision")


@dataclass
class Vocabulary:
    """The classes the heads predict, in head-output order: verbs (V), nouns (Nn; empty for data with one label
    set), and the action vocabulary, the (verb, noun) pairs seen in the training labels (EK-100 convention)."""

    verbs: list[str]
    nouns: list[str]
    action_pairs: list[tuple[int, int]] = field(default_factory=list)

    def difference(self, verbs: list[str], nouns: list[str]) -> str | None:
        """None when `verbs` and `nouns` are these classes in this order, else what differs first, e.g.
        "verb 3 is 'take' there but 'put' here" or "24 verbs there but 97 here"."""
        for what, mine, theirs in (("verb", self.verbs, list(verbs)), ("noun", self.nouns, list(nouns))):
            if len(mine) != len(theirs):
                return f"{len(theirs)} {what}s there but {len(mine)} here"
            for i, (a, b) in enumerate(zip(mine, theirs)):
                if a != b:
                    return f"{what} {i} is {b!r} there but {a!r} here"
        return None

    def to_dict(self) -> dict:
        return {"verbs": list(self.verbs), "nouns": list(self.nouns),
                "action_pairs": [[int(v), int(n)] for v, n in self.action_pairs]}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        return cls([str(v) for v in d["verbs"]], [str(n) for n in d["nouns"]],
                   [(int(v), int(n)) for v, n in d.get("action_pairs", [])])


@dataclass
class RunProgress:
    """Where a run stands: epochs completed, recognition and QA steps taken, the best selection metric so far (and
    its epoch, 1-based) and one metrics row per epoch (the rows of metrics.csv).

    `stopped_early`: None, or how the run stopped early (epoch, best_epoch, metric, patience, min_delta).
    `changes`: the settings a resume changed (`RESUME_FIELDS`), one dict each: epoch and step at the change, field,
    from, to. `lr_replan`: None, or where the learning-rate schedule was re-planned after a change of epochs (step,
    factor of the peak rate there, total steps of the new plan; `mambavl.train.schedule.LrPlan`)."""

    epoch: int = 0
    step: int = 0
    qa_steps: int = 0
    best_metric: float | None = None
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: dict | None = None
    changes: list[dict] = field(default_factory=list)
    lr_replan: dict | None = None


@dataclass
class TrainingState:
    """What resuming needs beyond the model: optimizer, scheduler and gradient-scaler states (`Optimizer.state_dict`)
    and the RNG states (`mambavl.train.state.rng_state`)."""

    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: dict


@dataclass
class TrainedModel:
    """A trained run: everything needed to rebuild, evaluate, resume or share the model (see the module docstring
    for the file layout). `model()` builds the network; `save` / `load` are the only checkpoint I/O."""

    model_config: ModelConfig
    train_config: TrainConfig
    vocab: Vocabulary
    features: FeatureSpec
    weights: dict[str, torch.Tensor]
    cache_schema_version: int = schema.SCHEMA_VERSION
    annotation: dict[str, str] = field(default_factory=dict)
    action_answers: torch.Tensor | None = None
    first_pass: dict | None = None
    train_candidates: torch.Tensor | None = None
    candidate_recall: dict[str, float] = field(default_factory=dict)
    progress: RunProgress = field(default_factory=RunProgress)
    package_version: str = __version__
    format_read: int = FORMAT  # the format of the file it was loaded from (migrated when older)

    # ---- what the run is
    @property
    def task(self) -> Task:
        return self.train_config.task

    @property
    def spec(self) -> TaskSpec:
        return task_spec(self.train_config.task)

    @property
    def question_source(self) -> QuestionSource:
        return self.train_config.question_source

    @property
    def has_nouns(self) -> bool:
        return len(self.vocab.nouns) > 0

    @property
    def selection_metric(self) -> str:
        return self.spec.selection_metric(self.has_nouns)

    @property
    def trained_with_qa(self) -> bool:
        return self.train_config.qa_weight > 0

    def model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The fusion model with these weights, in eval mode on `device`."""
        model = MambaVL(self.model_config)
        model.load_state_dict(self.weights)
        return model.to(resolve_device(str(device)) if isinstance(device, str) else device).eval()

    def first_pass_models(self, device: str | torch.device = "cpu") -> FirstPass | None:
        """Self-questioning's first pass (its models in eval mode on `device`), or None for a run without one."""
        if not self.first_pass:
            return None
        return FirstPass.from_state(self.first_pass, resolve_device(str(device)) if isinstance(device, str) else device)

    def cache_attrs(self) -> dict[str, Any]:
        """The training cache's identity as cache attributes (for `schema.check_compatible`)."""
        return {**self.features.to_attrs(), "schema_version": self.cache_schema_version}

    def check_cache(self, cache: Any, where: str, what: str = "cache") -> None:
        """InputError unless `cache` (a `CacheFile`) holds features of the same encoders and the same classes in the
        same order as this run's; the message names both files and the first difference."""
        # both sides read through FeatureSpec, so an attribute an older cache did not write means what it implied
        theirs = {**FeatureSpec.from_attrs(cache.attrs).to_attrs(), "schema_version": cache.attrs.get("schema_version")}
        schema.check_compatible(self.cache_attrs(), theirs, where, f"{what} {cache.path}")
        diff = self.vocab.difference(cache.verb_keys, cache.noun_keys)
        if diff is not None:
            raise InputError(f"{what} {cache.path} has other verb/noun classes (classes/verb, classes/noun) than "
                             f"{where}: {diff}. Head output i of the model means class i of the run's own class "
                             "CSVs: use a cache extracted with those class CSVs")

    # ---- I/O
    def to_state(self, training: TrainingState | None = None) -> dict[str, Any]:
        """The plain dict `save` writes (format 2)."""
        return {
            "kind": KIND,
            "format": FORMAT,
            "package_version": self.package_version,
            "model_config": self.model_config.to_dict(),
            "train_config": plain(dataclasses.asdict(self.train_config)),
            "vocab": self.vocab.to_dict(),
            "features": self.features.to_attrs(),
            "cache_schema_version": int(self.cache_schema_version),
            "annotation": dict(self.annotation),
            "weights": self.weights,
            "action_answers": self.action_answers,
            "first_pass": self.first_pass,
            "train_candidates": self.train_candidates,
            "candidate_recall": dict(self.candidate_recall),
            "progress": plain(dataclasses.asdict(self.progress)),
            # the fields as they are: `dataclasses.asdict` deep-copies every tensor on its own, so views into one
            # buffer (a flat optimizer's moments) were written with a whole copy of the buffer each
            "training": ({f.name: getattr(training, f.name) for f in dataclasses.fields(training)}
                         if training is not None else None),
        }

    def save(self, path: str | os.PathLike, training: TrainingState | None = None) -> None:
        """Write the checkpoint atomically (a crash leaves the previous file; TrainingStopped when it cannot be
        written). `training`: the optimizer/scheduler/RNG states for resuming (last.pt)."""
        atomic_torch_save(self.to_state(training), Path(path))

    @classmethod
    def from_state(cls, state: dict[str, Any], where: str) -> TrainedModel:
        """A TrainedModel from a format-2 dict (`to_state`); InputError naming `where` for a malformed one."""
        try:
            return cls(
                model_config=model_config_from_dict(state["model_config"]),
                train_config=_train_config(state["train_config"]),
                vocab=Vocabulary.from_dict(state["vocab"]),
                features=FeatureSpec.from_attrs(state["features"]),
                weights=state["weights"],
                cache_schema_version=int(state.get("cache_schema_version", schema.SCHEMA_VERSION)),
                annotation={str(k): str(v) for k, v in (state.get("annotation") or {}).items()},
                action_answers=state.get("action_answers"),
                first_pass=state.get("first_pass"),
                train_candidates=state.get("train_candidates"),
                candidate_recall={str(k): float(v) for k, v in (state.get("candidate_recall") or {}).items()},
                progress=RunProgress(**state.get("progress", {})),
                package_version=str(state.get("package_version", "?")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: malformed mambavl checkpoint ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> TrainedModel:
        """Read a checkpoint (any format this version knows, migrated); tensors on `device`."""
        return cls.load_with_state(path, device)[0]

    @classmethod
    def load_with_state(cls, path: str | os.PathLike, device: str | torch.device = "cpu"
                        ) -> tuple[TrainedModel, TrainingState | None]:
        """Read a checkpoint and its training state (None in a checkpoint saved without one). The one
        `torch.load` of mambavl checkpoints, always `weights_only=True`. InputError for a missing file, a file that
        is not a mambavl checkpoint (truncated, another program's) or one of a newer format.

        `path` may also be a model folder (`mambavl export`: config.json + model.safetensors, checked against the
        sha256 it records) or ``hf://ORG/NAME[@REV]`` (`mambavl.runtime.hub.resolve_checkpoint`)."""
        path = hub.resolve_checkpoint(path)
        dev = resolve_device(str(device)) if isinstance(device, str) else device
        if hub.is_model_folder(path):
            state = hub.read_folder(path, dev)
        elif not path.is_file():
            raise InputError(f"{path}: checkpoint not found")
        else:
            try:
                state = torch.load(path, map_location=dev, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a readable checkpoint"
                raise InputError(f"{path}: not a mambavl checkpoint, or damaged ({type(exc).__name__}: "
                                 f"{str(exc)[:200]})") from None
        if not isinstance(state, dict) or state.get("kind") != KIND:
            raise InputError(f"{path}: not a mambavl checkpoint (no 'kind': {KIND!r} entry)")
        read = state.get("format")
        if not isinstance(read, int) or read > FORMAT:
            raise InputError(f"{path}: checkpoint format {read!r} was written by a newer mambavl "
                             f"({state.get('package_version', '?')}); this version ({__version__}) reads formats up to "
                             f"{FORMAT}: upgrade mambavl")
        state = _migrate(state, read)
        artifact = cls.from_state(state, str(path))
        artifact.format_read = read
        training = state.get("training")
        return artifact, (TrainingState(**training) if training else None)


def same_run(saved: TrainConfig, wanted: TrainConfig, resuming: bool = False) -> str | None:
    """None when `wanted` continues the run `saved` describes, else the first TrainConfig field (in declaration
    order) that differs, outside `FREE_FIELDS` (and `RESUME_FIELDS` when `resuming`: a resumed run may change its
    budget of epochs and its early stopping). The one rule for "is this the same run?" (resume, ablation reuse)."""
    a, b = plain(dataclasses.asdict(saved)), plain(dataclasses.asdict(wanted))
    free = FREE_FIELDS + RESUME_FIELDS if resuming else FREE_FIELDS
    for f in dataclasses.fields(TrainConfig):
        if f.name not in free and a.get(f.name) != b.get(f.name):
            return f.name
    return None


def _train_config(values: dict) -> TrainConfig:
    """TrainConfig from a checkpoint's plain values (fields this version does not know are dropped). Presets'
    training settings are not re-applied: the saved values are the run's. A run saved before early stopping
    existed had none (patience 0)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {"patience": 0, **values}
    if "precision" not in values:  # before --precision: `amp` (autocast on CUDA, as precision auto) or fp32
        values["precision"] = "auto" if values.get("amp", True) else "fp32"
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in known and k != "preset"})
    cfg.preset = str(values.get("preset", cfg.preset))
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# migrations


def _migrate(state: dict, read: int) -> dict:
    """`state` of format `read` rewritten as format 2 (a no-op for format 2)."""
    if read == 1:
        state = _from_format_1(state)
    return state


def _from_format_1(old: dict) -> dict:
    """Format 1: a flat dict (model, cache_attrs, optimizer, scheduler, scaler, rng, epoch, step, ...)."""
    weights = dict(old["model"])
    weights.setdefault("scene_bias", torch.tensor(0.0))  # before the scene prior bias: scene logits had none
    tc = dict(old["train_config"])
    tc.setdefault("min_steps", 0)  # before the step floor: none, so a resumed run keeps its schedule
    attrs = dict(old.get("cache_attrs") or {})
    features = FeatureSpec.from_attrs(attrs).to_attrs()  # missing text_encoder: the CLIP text tower
    fp = old.get("first_pass")
    if fp is not None and "scene_bias" not in fp["states"][0]:
        fp = {**fp, "states": [{**s, "scene_bias": torch.tensor(0.0)} for s in fp["states"]]}
    training = None
    if old.get("optimizer") is not None:
        training = {"optimizer": old["optimizer"], "scheduler": old["scheduler"], "scaler": old.get("scaler"),
                    "rng": old["rng"]}
    return {
        "kind": KIND,
        "format": FORMAT,
        "package_version": str(old.get("package_version", "?")),
        "model_config": old["model_config"],
        "train_config": tc,
        "vocab": old["vocab"],
        "features": features,
        "cache_schema_version": int(attrs.get("schema_version", 1) or 1),
        "annotation": {},
        "weights": weights,
        "action_answers": old.get("action_answers"),
        "first_pass": fp,
        "train_candidates": old.get("train_candidates"),
        "candidate_recall": old.get("candidate_recall") or {},
        "progress": {"epoch": int(old.get("epoch", 0)), "step": int(old.get("step", 0)),
                     "qa_steps": int(old.get("qa_steps", 0)), "best_metric": old.get("best_metric"),
                     "history": list(old.get("history", []))},
        "training": training,
    }
