"""Run every unlearning method with its tiny-model defaults and print one table.

    .venv/bin/python benchmarks/unlearn_methods.py                # runs/d1/{world,orig}
    .venv/bin/python benchmarks/unlearn_methods.py --threads 1 --json runs/unlearn_bench.json
    .venv/bin/python benchmarks/unlearn_methods.py --seed 1 --world runs/s1/world --model runs/s1/orig

The model is the demo's: a ``tiny-1m`` Llama pretrained on the ``small``
world (seed 0).  If ``--model`` / ``--world`` do not exist they are created
first (``rtteval world`` + ``rtteval pretrain``, about 90 s on 2 cores), from
``--seed`` (the world's and the pretraining's), so other seeds' models can be
measured the same way.  The last column says whether a run meets the
issue's criterion: forget <= 0.35 and retain >= the original's - 0.05.
Each method starts from the same weights (restored from memory) and stops
early once mean forget accuracy reaches its target.  The numbers are
recorded in ``docs/methods.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from rtteval.data import load_dataset
from rtteval.methods import METHODS
from rtteval.models import load_model, restore_state, snapshot_state
from rtteval.stages.unlearn import UnlearnConfig, unlearn


def ensure_model(world: Path, model: Path, threads: int, seed: int = 0) -> None:
    if not (world / "manifest.json").exists():
        from rtteval.data.world import write_world

        write_world(world, seed=seed, preset="small")
    if not (model / "config.json").exists():
        from rtteval.stages.pretrain import PretrainConfig, pretrain

        torch.set_num_threads(threads)
        cfg = PretrainConfig(model_preset="tiny-1m", seed=seed)
        pretrain(world, model, cfg, progress=False)


def meets(r: dict) -> bool:
    """The issue's criterion: forget <= 0.35 with retain within 5 points of the original."""
    return r["forget_after"] <= 0.35 and r["retain_after"] >= r["retain_before"] - 0.05 - 1e-9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=Path("runs/d1/world"))
    ap.add_argument("--model", type=Path, default=Path("runs/d1/orig"))
    ap.add_argument("--methods", default=",".join(sorted(METHODS)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="world and pretraining seed, if built")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    ensure_model(args.world, args.model, args.threads, args.seed)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu")
    ds = load_dataset(args.world)
    start = snapshot_state(model)
    rows = []
    for name in args.methods.split(","):
        restore_state(model, start)
        t0 = time.perf_counter()
        res = unlearn(model, tok, ds, UnlearnConfig(method=name), progress=False)
        rows.append(
            {
                "method": name,
                "status": res.status,
                "forget_before": res.before["forget_acc"],
                "retain_before": res.before["retain_acc"],
                "forget_after": res.after["forget_acc"],
                "retain_after": res.after["retain_acc"],
                "steps": res.steps,
                "seconds": time.perf_counter() - t0,
                "config": {
                    k: res.config[k]
                    for k in ("lr", "optimizer", "adam_eps", "train_only", "target_forget_acc")
                }
                | res.config["hparams"],
            }
        )
        r = rows[-1]
        print(
            f"{name:7s} {r['status']:13s} forget {r['forget_before']:.3f} -> {r['forget_after']:.3f}"
            f"  retain {r['retain_before']:.3f} -> {r['retain_after']:.3f}"
            f"  steps {r['steps']:4d}  {r['seconds']:6.1f} s  {'met' if meets(r) else 'no'}",
            flush=True,
        )
    print()
    print(
        "| method | forget before | forget after | retain before | retain after | steps "
        "| seconds | criterion |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
    for r in rows:
        print(
            f"| {r['method']} | {r['forget_before']:.3f} | {r['forget_after']:.3f} "
            f"| {r['retain_before']:.3f} | {r['retain_after']:.3f} | {r['steps']} "
            f"| {r['seconds']:.1f} | {'met' if meets(r) else 'no'} |"
        )
    if args.json:
        meta = {
            "model": str(args.model),
            "world": str(args.world),
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d"),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
