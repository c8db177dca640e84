"""CPU benchmark: the demo's RTT stage, rtteval versus the paper-shaped loop, same jobs.

    python benchmarks/rtt_cpu.py [--model DIR] [--world DIR] [--folds N] [--epochs E]
                                 [--threads T] [--sequential | --compare-sequential]

Both sides run every (fold, learning rate) of the grid on the same model with
the same optimization (Lion, batch 4, same lr, same number of steps; no
warmup, constant lr) and report V accuracy after the last epoch.  Only the
engineering differs (see benchmarks/paper_loop.py).  rtteval trains a fold's
learning rates as one batched model (``--sequential``: one by one, as before;
``--compare-sequential``: time both).  The model is the demo's unlearned (else
pretrained) model from ``runs/demo``; run ``make demo`` first.

Wall times are the measure; CPU times (all threads of this process) are printed
too, since on a shared machine wall time also counts waiting for a core.
The last line is ``speedup: <baseline time / rtteval time>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_loop import paper_rtt_run  # noqa: E402

from rtteval.attacks.folds import build_folds  # noqa: E402
from rtteval.attacks.rtt import RTTConfig, attack_model  # noqa: E402
from rtteval.data import load_dataset  # noqa: E402
from rtteval.models import load_model  # noqa: E402
from rtteval.stages.pretrain import retain_eval_name, scoring_for  # noqa: E402


def find_demo(root: Path) -> tuple[Path, Path] | None:
    worlds = sorted(root.glob("jobs/world/*/data"))
    worlds = [w for w in worlds if (w / "manifest.json").exists()]
    models = [p.parent for p in sorted(root.glob("jobs/unlearn/*/model/config.json"))]
    models += [p.parent for p in sorted(root.glob("jobs/pretrain/*/model/config.json"))]
    if worlds and models:
        return models[0], worlds[0]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path)
    ap.add_argument("--world", type=Path)
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--threads", type=int, default=2)
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--sequential", action="store_true", help="rtteval trains lrs one by one")
    how.add_argument("--compare-sequential", action="store_true", help="also time that")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, world = args.model, args.world
    if model_dir is None or world is None:
        found = find_demo(args.demo)
        if found is None:
            sys.exit("no model: run `make demo` first or pass --model DIR --world DIR")
        model_dir, world = found
    lrs = [float(x) for x in args.lrs.split(",")]
    ds = load_dataset(world)
    scoring = scoring_for(ds, batch_size=128)
    retain_q = ds.retain[retain_eval_name(ds)]
    cfg = RTTConfig(
        lrs=lrs,
        epochs=args.epochs,
        batch_size=4,
        optimizer="lion",
        text_format="qa",
        holdout_fraction=0.0,
        folds=list(ds.splits)[: args.folds],
        retain_eval="end",
        grad_clip=None,
    )
    folds = build_folds(ds, cfg)
    print(
        f"model {model_dir}\nworld {world}\n{len(folds)} folds x {len(lrs)} lrs x {args.epochs} epochs, Lion, batch 4"
    )

    def run_rtteval(batched: bool) -> tuple[dict, float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        model, tok = load_model(model_dir, device="cpu")
        attack = attack_model(
            model, tok, ds, cfg, scoring, retain_questions=retain_q, label="bench", batched=batched
        )
        finals = {(fa.v, r.lr): r.epochs[-1].v_acc for fa in attack.folds for r in fa.runs}
        return finals, time.perf_counter() - w0, time.process_time() - c0

    ours, t_rtteval, c_rtteval = run_rtteval(batched=not args.sequential)
    if args.compare_sequential:
        seq, t_seq, c_seq = run_rtteval(batched=False)

    t0, c0 = time.perf_counter(), time.process_time()
    base = {}
    for fold in folds:
        for lr in lrs:
            curve = paper_rtt_run(
                model_dir,
                fold.train_texts,
                ds.splits[fold.v],
                retain_q,
                scoring,
                lr=lr,
                epochs=args.epochs,
            )
            base[(fold.v, lr)] = curve[-1]
    t_base, c_base = time.perf_counter() - t0, time.process_time() - c0

    def agreement(a: dict, b: dict) -> str:
        d = [abs(a[k] - b[k]) for k in b]
        return f"|diff| per run: mean {sum(d) / len(d):.3f}, max {max(d):.3f}"

    mean_ours = sum(ours[k] for k in base) / len(base)
    mean_base = sum(base.values()) / len(base)
    print(
        f"final V accuracy, mean over {len(base)} runs: rtteval {mean_ours:.3f}  baseline {mean_base:.3f}  "
        f"({agreement(ours, base)})"
    )
    mode = "lrs one by one" if args.sequential else "lr grid batched"
    if args.compare_sequential:
        print(f"final V accuracy, batched vs lrs one by one: {agreement(ours, seq)}")
        print(f"rtteval, lrs one by one: {t_seq:.1f} s (CPU {c_seq:.1f} s)")
    print(f"baseline (paper-shaped) time: {t_base:.1f} s (CPU {c_base:.1f} s)")
    print(f"rtteval time ({mode}): {t_rtteval:.1f} s (CPU {c_rtteval:.1f} s)")
    print(f"speedup: {t_base / t_rtteval:.2f}")


if __name__ == "__main__":
    main()
