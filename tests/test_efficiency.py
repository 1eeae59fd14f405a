"""Efficiency analysis: structure and sanity of FLOPs / latency / memory rows (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch

from mambavl.analysis.efficiency import (
    SCAN_FWD_FLOPS_PER_STATE,
    EfficiencyConfig,
    count_flops,
    efficiency_model,
    make_batch,
    measure_efficiency,
    record_scans,
    rss_calibration,
)
from mambavl.errors import InputError

# Tiny shapes: the structure of the cost, not its size, is under test.
TINY = dict(batch_size=1, question_tokens=4, d_model=16, n_layers=2, video_dim=8, text_dim=8, num_verbs=5,
            num_nouns=4, repeats=1, memory="none")
LENGTHS = (20, 36, 52)  # equally spaced: the second difference isolates the quadratic term


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("eff")
    cfg = EfficiencyConfig(out_dir=str(out), lengths=LENGTHS, **TINY)
    return cfg, measure_efficiency(cfg), out


def _by(rows, fusion, key):
    return [r[key] for r in sorted(rows, key=lambda r: r["total_tokens"]) if r["fusion"] == fusion]


def test_rows_files_and_growth(rows):
    cfg, result, out = rows
    assert len(result) == len(LENGTHS) * 3
    assert {r["fusion"] for r in result} == {"mamba", "transformer", "concat"}
    payload = json.loads((out / "efficiency.json").read_text())
    assert len(payload["rows"]) == len(result)
    assert (out / "efficiency.png").stat().st_size > 1000
    assert "| mamba | 20 (4+16)" in (out / "efficiency.md").read_text()
    for r in result:
        assert r["params"] > r["fusion_params"] > 0
        assert r["latency_s"] > 0 and len(r["latency_runs"]) == 1
        assert r["flops_train_step"] > r["flops_forward"] > 0
        assert r["video_tokens"] == r["total_tokens"] - r["question_tokens"]
        assert r["peak_memory_bytes"] is None
    for f in ("mamba", "transformer", "concat"):
        fl = _by(result, f, "flops_train_step")
        assert fl == sorted(fl) and fl[0] < fl[-1], f


def test_scan_flops_follow_the_formula_and_are_linear(rows):
    cfg, result, _ = rows
    d_inner = 2 * cfg.d_model  # expand 2 in the small preset
    for r in (r for r in result if r["fusion"] == "mamba"):
        # joint layout: one scan per layer over [question ; video], verb and noun questions batched (2B rows)
        expected = cfg.n_layers * SCAN_FWD_FLOPS_PER_STATE * (2 * cfg.batch_size) * r["total_tokens"] * d_inner * 16
        assert r["flops_scan_forward"] == expected
        assert r["scan_calls"] == cfg.n_layers
    for f in ("transformer", "concat"):
        assert set(_by(result, f, "flops_scan_forward")) == {0}
    # Every op of the mamba and concat models is linear in the length: the second difference vanishes exactly.
    for f in ("mamba", "concat"):
        a, b, c = _by(result, f, "flops_forward")
        assert a - 2 * b + c == 0, f


def test_transformer_attention_term_is_quadratic(rows):
    cfg, result, _ = rows
    a, b, c = _by(result, "transformer", "flops_forward")
    step = LENGTHS[1] - LENGTHS[0]
    # Self-attention over F video tokens costs 4·Bt·F²·d per layer (QKᵀ and AV, 2 FLOPs per multiply-add); its
    # second difference over F, F+s, F+2s is 4·Bt·d·2s². Everything else is linear. This fails if the CPU attention
    # kernel goes uncounted.
    bt = 2 * cfg.batch_size
    assert a - 2 * b + c == cfg.n_layers * 4 * bt * cfg.d_model * 2 * step**2


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_scan_counted_once_whatever_the_implementation(impl):
    cfg = EfficiencyConfig(lengths=(24,), fusions=("mamba",), **TINY)
    batch = make_batch(cfg, 24, torch.device("cpu"))
    base = count_flops(efficiency_model(cfg, "mamba", 24, torch.device("cpu")), batch)
    cfg.extra = {"scan_impl": impl}
    other = count_flops(efficiency_model(cfg, "mamba", 24, torch.device("cpu")), batch)
    # The chunked scan is made of einsums torch would count; record_scans must route it away from the counter.
    assert other == base


def test_record_scans_restores_the_models_scan_implementation():
    from mambavl.fuse import block, scan

    cfg = EfficiencyConfig(lengths=(24,), fusions=("mamba",), **TINY)
    cfg.extra = {"scan_impl": "chunked"}
    model = efficiency_model(cfg, "mamba", 24, torch.device("cpu"))

    def impls():
        return [m.scan_impl for m in model.modules() if hasattr(m, "scan_impl")]

    before, module_scan = impls(), block.selective_scan
    assert before and set(before) == {"chunked"}
    with record_scans(model) as calls:
        assert all(impl != "chunked" and callable(impl) for impl in impls())  # every scan of the model is routed
        with torch.no_grad():
            model(*make_batch(cfg, 24, torch.device("cpu"))[:4])
        assert calls  # ... and recorded
    assert impls() == before  # the model's own implementation is back
    assert model.cfg.scan_impl == "chunked"
    assert block.selective_scan is module_scan is scan.selective_scan  # no module was patched


def test_rss_memory_in_a_fresh_process(tmp_path):
    calib = rss_calibration(32)
    assert calib["trusted"]
    assert 0.8 * calib["expected_bytes"] < calib["peak_bytes"] < 1.5 * calib["expected_bytes"]
    cfg = EfficiencyConfig(lengths=(40,), fusions=("transformer",), **{**TINY, "memory": "rss"})
    (row,) = measure_efficiency(cfg)
    assert row["memory_method"] == "rss" and row["memory_trusted"] is True
    assert row["peak_memory_bytes"] > 0


def test_bad_config_is_input_error():
    with pytest.raises(InputError, match="question tokens"):
        EfficiencyConfig(lengths=(4,), **TINY)
    with pytest.raises(InputError, match="fusion"):
        EfficiencyConfig(fusions=("lstm",), **TINY)
    with pytest.raises(InputError, match="memory"):
        EfficiencyConfig(**{**TINY, "memory": "psutil"})


def test_memory_guard_refuses_before_running(monkeypatch, tmp_path):
    """A run whose estimated peak exceeds the memory available is refused (exit 2) naming the options to lower,
    before any model runs; the estimate grows with the square of the length for the transformer only."""
    import mambavl.analysis.efficiency as E
    from typer.testing import CliRunner

    from mambavl.cli import app

    ran = []
    monkeypatch.setattr(E, "count_flops", lambda *a, **k: ran.append(1))
    monkeypatch.setattr(E, "available_memory", lambda device: 10 * 2**20)  # a machine with 10 MiB free
    with pytest.raises(InputError, match="--lengths") as err:
        measure_efficiency(EfficiencyConfig(lengths=(1024,), **TINY))
    assert "8.0 MiB this run may use (80% of the 10.0 MiB available)" in str(err.value) and not ran
    res = CliRunner().invoke(app, ["efficiency", "--out", str(tmp_path / "e"), "--lengths", "4096",
                                   "--memory-budget", "0.5", "--quiet"])
    assert res.exit_code == 2 and "transformer at 4096 tokens" in res.output and "--batch-size" in res.output
    assert not (tmp_path / "e").exists()
    # the estimate: linear in length for mamba and concat, quadratic for the transformer
    for fusion, power in (("mamba", 1), ("concat", 1), ("transformer", 2)):
        small, large = (E.estimate_step_bytes(fusion, 2, n, 128, 2, 16, 2, 4, 512) for n in (4096, 8192))
        assert 2 ** power * 0.9 < large / small <= 2 ** power + 1e-9, fusion


def test_latency_noise_is_flagged():
    from mambavl.analysis.efficiency import efficiency_markdown, flag_noise

    def row(fusion, n, runs):
        return {"fusion": fusion, "total_tokens": n, "question_tokens": 4, "video_tokens": n - 4, "params": 1,
                "flops_forward": 1, "flops_train_step": 2, "flops_scan_forward": 0, "latency_s": sorted(runs)[1],
                "latency_runs": runs, "peak_memory_bytes": None}

    rows = [row("mamba", 100, [1.0, 1.1, 1.2]), row("mamba", 200, [2.0, 2.1, 2.2]),  # clean: +1 s, spread 0.2
            row("concat", 100, [0.1, 1.2, 1.3]), row("concat", 200, [0.1, 0.15, 0.2]),  # fell with length
            row("transformer", 100, [1.0, 1.5, 2.0]), row("transformer", 200, [1.5, 1.8, 2.5])]  # spread > change
    flag_noise(rows)
    flags = {(r["fusion"], r["total_tokens"]): r["latency_noise"] for r in rows}
    assert flags[("mamba", 200)] is None and flags[("mamba", 100)] is None
    assert "fell" in flags[("concat", 200)] and "spread" in flags[("transformer", 200)]
    md = efficiency_markdown(rows)
    assert md.count("(noisy)") == 3 and "concat at 200 tokens: latency fell" in md  # 2 cells + the legend line
