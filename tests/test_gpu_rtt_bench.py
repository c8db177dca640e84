"""benchmarks/gpu_rtt.py runs end to end (``--smoke``: tiny model on CPU); it tests that, not speed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script():
    path = REPO_ROOT / "benchmarks" / "gpu_rtt.py"
    spec = importlib.util.spec_from_file_location("gpu_rtt_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_rtt_smoke_writes_every_measurement(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu_rtt.json"
    data = load_script().main(["--smoke", "--out", str(out), "--steps", "1", "--eval-steps", "1"])
    assert json.loads(out.read_text()) == data
    assert data["errors"] == []
    assert data["meta"]["smoke"] is True
    assert data["peak_matmul"]["tflops"] > 0
    assert data["flops"]["n_matmul"] > 0
    modes = ("fp32", "bf16", "bf16-pure", "fp16")
    per_mode = [f"rtteval_bs4_{m}{c}" for c in ("", "_checkpointing") for m in modes]
    for key in ("baseline_bs4", "rtteval_bs4", "rtteval_bs4_snapshot", "rtteval_bs8", *per_mode):
        row = data["train"][key]
        for field in ("step_s_mean", "tokens_per_s", "tflops", "mfu"):
            assert row[field] > 0, (key, field)
        assert 0 < row["padding_efficiency"] <= 1
    for key in ("bs4_copy", "bs8_letters", "bs8_copy", "bs8_forward", "bs8_last"):
        row = data["eval"][key]
        for field in ("batch_s_mean", "tokens_per_s", "mfu"):
            assert row[field] > 0, (key, field)
    for key in per_mode:
        row = data["train"][key]
        assert row["precision"] == key.split("_")[2]
        assert row["gradient_checkpointing"] == key.endswith("_checkpointing")
    # lr 1e-6 is below half a bf16 / fp16 rounding step of typical weights, not an fp32 one
    assert data["train"]["rtteval_bs4_bf16-pure"]["lost_update_warnings"]
    assert not data["train"]["rtteval_bs4_bf16"]["lost_update_warnings"]
    assert not data["train"]["rtteval_bs4_fp32"]["lost_update_warnings"]
    for key, (rank, n) in {"r4_x1": (4, 1), "r4_x3": (4, 3)}.items():
        row = data["lora"][key]
        assert (row["rank"], row["adapters"]) == (rank, n)
        assert row["step_s_mean"] > 0 and row["tokens_per_s"] > 0
        assert row["adapter_params_total"] == n * data["lora"]["r4_x1"]["adapter_params_total"]
    est = data["sweep_estimate"]
    assert est["sweep"]["steps_per_epoch"] == 158
    assert est["baseline"]["total_s"] > 0 and est["rtteval"]["total_s"] > 0
    assert est["ratio_baseline_over_rtteval"] > 0
    assert data["headline"]["speedup_step_bs4"] > 0
    assert data["headline"]["mfu_eval"] > 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("speedup_step_bs4: ")
    assert lines[-1].startswith("mfu_eval: ")
