"""Record the fusion models' outputs and gradients for `tests/test_fusion_reference.py`.

Each case is a tiny model (d_model 16) of one model variant with fixed weights; the file holds its state dict, the
inputs (padded clips and questions), the recognition outputs, the QA logits and every parameter's gradient of a
fixed scalar loss, as the model code of the writing commit computed them (float64, dropout off). The test loads the
weights into today's model and checks that it computes the same numbers, so a rewrite of the layer's arithmetic
(fewer, larger kernels) cannot change what the model computes. Written once from the commit before that rewrite:

    PYTHONPATH=. python tests/data/fusion_reference/make_reference.py tests/data/fusion_reference/reference.pt
"""

from __future__ import annotations

import sys

import torch

from mambavl.fuse.model import create_model

DV, DT, V, NN, A = 12, 10, 5, 4, 3
TINY = dict(video_dim=DV, text_dim=DT, num_verbs=V, num_nouns=NN, num_actions=A, d_model=16, dropout=0.0,
            max_frames=8)
# name -> (preset, ModelConfig overrides)
CASES = {
    "joint": ("small", {}),
    "parallel": ("paper", {"n_layers": 2}),
    "disjoint-A": ("disjoint-A", {}),
    "video-only": ("video-only", {}),
    "joint-bidirectional": ("small", {"bidirectional": True}),
    "parallel-bidirectional-disjoint": ("paper", {"bidirectional": True, "shared_A": False}),
}


def inputs(b: int = 3, f: int = 6, t: int = 5) -> dict[str, torch.Tensor]:
    """Clip 1 padded after 4 frames; clip 0's questions padded after 3 tokens; clip 2's noun question after 1."""
    g = torch.Generator().manual_seed(1)
    vmask = torch.ones(b, f, dtype=torch.bool)
    vmask[1, 4:] = False
    qmask = torch.ones(b, 2, t, dtype=torch.bool)
    qmask[0, :, 3:] = False
    qmask[2, 1, 1:] = False
    return {"video": torch.randn(b, f, DV, generator=g, dtype=torch.float64), "vmask": vmask,
            "q": torch.randn(b, 2, t, DT, generator=g, dtype=torch.float64), "qmask": qmask,
            "answers": torch.randn(7, DT, generator=g, dtype=torch.float64)}


def run(model, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs and parameter gradients of one fixed scalar loss over the recognition and QA outputs."""
    model.zero_grad(set_to_none=True)
    out = model(x["video"], x["vmask"], x["q"], x["qmask"])
    h = model.fuse(x["video"], x["vmask"], x["q"][:, 1], x["qmask"][:, 1])
    qa = model.qa_logits(model.qa_embed(h), x["answers"])
    res = {f"out.{k}": v.detach() for k, v in out.items()}
    res["qa"] = qa.detach()
    g = torch.Generator().manual_seed(2)
    loss = sum((v * torch.randn(v.shape, generator=g, dtype=v.dtype)).sum() for v in (*out.values(), qa))
    loss.backward()
    res.update({f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    return res


def build(name: str, state_dict: dict | None = None):
    """The case's model in float64, eval mode; with `state_dict` its recorded weights."""
    preset, overrides = CASES[name]
    torch.manual_seed(0)
    model, _ = create_model(preset, **{**TINY, **overrides})
    model = model.double().eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def main(path: str) -> None:
    x = inputs()
    cases = {}
    for name in CASES:
        model = build(name)
        model = build(name, {k: v.float() for k, v in model.state_dict().items()})  # weights exact in float32
        # stored as float32 (half the size); the test loads them into a float64 model and compares to 1e-6
        cases[name] = {"state_dict": {k: v.float() for k, v in model.state_dict().items()},
                       "values": {k: v.float() for k, v in run(model, x).items()}}
    torch.save({"inputs": x, "cases": cases}, path)


if __name__ == "__main__":
    main(sys.argv[1])
