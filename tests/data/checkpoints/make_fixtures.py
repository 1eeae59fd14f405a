"""Write the checkpoint fixtures of tests/test_artifact.py with the mambavl version that is importable.

Run it from a checkout of the mambavl commit whose checkpoint format a fixture keeps (each fixture's name says which,
see README.md here):

    PYTHONPATH=<checkout> python tests/data/checkpoints/make_fixtures.py --out tests/data/checkpoints --name NAME KIND

KIND: recognition (template questions), anticipation, predicted (self-questioning, recognition). Each run trains a
tiny model (d_model 16, one layer) for one epoch on a planted cache and keeps its last.pt as NAME.pt. The test
feeds the inputs of `probe_inputs` to the migrated checkpoint's model and compares the logits with NAME.npz, the
logits the writing version's own model gave.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from mambavl.cache.synthetic import make_planted_cache  # noqa: E402
from mambavl.fuse.model import MambaVL, model_config_from_dict  # noqa: E402
from mambavl.train import TrainConfig, train  # noqa: E402

# The planted data every fixture is trained and checked on (tests/test_artifact.py uses the same numbers).
TRAIN = dict(n=48, seed=0, frames=4, dim=16, text_dim=8, noise=1.5, anticipation=True)
VAL = dict(n=32, seed=1, frames=4, dim=16, text_dim=8, noise=1.5, anticipation=True)


def probe_inputs(batch: int = 4, frames: int = 4, tokens: int = 6) -> tuple[torch.Tensor, ...]:
    """Seeded inputs of the fixtures' width: video (B, F, 16), mask (B, F), questions (B, 2, T, 8), mask (B, 2, T)."""
    rng = np.random.default_rng(0)
    video = torch.as_tensor(rng.normal(size=(batch, frames, 16)), dtype=torch.float32)
    q = torch.as_tensor(rng.normal(size=(batch, 2, tokens, 8)), dtype=torch.float32)
    return video, torch.ones(batch, frames, dtype=torch.bool), q, torch.ones(batch, 2, tokens, dtype=torch.bool)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["recognition", "anticipation", "predicted"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        train_cache = make_planted_cache(d / "train.h5", **TRAIN)
        val_cache = make_planted_cache(d / "val.h5", **VAL)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        values = dict(train_cache=str(train_cache), val_cache=str(val_cache), out_dir=str(d / "run"),
                      model_overrides={"d_model": 16, "n_layers": 1}, epochs=1, batch_size=8, frames=4, seed=0,
                      device="cpu")
        if args.kind == "anticipation":
            values["task"] = "anticipation"
        if args.kind == "predicted":
            values.update(question_source="predicted", candidates_k=2, candidate_folds=2)
        if "min_steps" in fields:
            values["min_steps"] = 0
        train(TrainConfig(**values))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(d / "run" / "last.pt", out / f"{args.name}.pt")
        ckpt = torch.load(out / f"{args.name}.pt", weights_only=True)
        model = MambaVL(model_config_from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        model.eval()
        with torch.no_grad():
            logits = model(*probe_inputs())
        np.savez(out / f"{args.name}.npz", **{k: v.numpy() for k, v in logits.items()})
        print(f"wrote {out / (args.name + '.pt')} ({(out / (args.name + '.pt')).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
