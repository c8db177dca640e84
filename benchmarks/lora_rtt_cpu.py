"""CPU benchmark: LoRA-RTT's batched adapters vs adapters one by one vs full-fine-tune RTT.

    python benchmarks/lora_rtt_cpu.py [--models DIR | --demo runs/demo] [--folds N]
                                      [--epochs E] [--rank R] [--threads T]

All three run the same grid on the demo's model — the batch size, optimizer
and loss of the demo's RTT, three learning rates each (each attack's tiny
defaults: LoRA's sit higher, docs/attacks.md), on the first ``--folds`` folds
for ``--epochs`` epochs (1 and 3 by default, to stay within a few minutes on
2 cores; the demo's RTT is 5 folds x 5 epochs) — and report V accuracy after
the last epoch:

1. LoRA-RTT, the lr grid as one batch of stacked adapters (``LoraEnsemble``);
2. LoRA-RTT, the adapters one by one through peft (``batched: false``);
3. RTT, full fine-tuning (its lr grid batched, as the demo runs it).

The model is the demo's pretrained original: from ``--demo`` (a finished
``make demo``), else ``--models DIR`` (default ``runs/bench-models``), where
the demo's seed-0 world and original are made on first use (a minute or
two; reused afterwards).  Wall times are the measure; CPU times (all threads
of this process) are printed too, since on a shared machine wall time also
counts waiting for a core.  The last line is ``speedup: <one by one /
batched>`` for the LoRA adapters.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rtt_cpu import find_demo  # noqa: E402

from rtteval.attacks import AttackContext  # noqa: E402
from rtteval.attacks.lora_rtt import LoraRTT, LoraRTTSpec  # noqa: E402
from rtteval.attacks.records import ModelAttack  # noqa: E402
from rtteval.attacks.rtt import RTTConfig, attack_model  # noqa: E402
from rtteval.data import load_dataset  # noqa: E402
from rtteval.models import load_model  # noqa: E402
from rtteval.stages.pretrain import scoring_for  # noqa: E402


def demo_models(root: Path) -> tuple[Path, Path]:
    """The demo's seed-0 world and pretrained original under ``root`` (made if absent)."""
    from rtteval.data.world import write_world
    from rtteval.stages.pretrain import PretrainConfig, pretrain

    world, model = root / "world", root / "original"
    if not (world / "manifest.json").exists():
        write_world(world, seed=0, preset="small")  # the demo's dataset (configs/demo.yaml)
    if not (model / "config.json").exists():
        print(f"pretraining the demo's original into {model} (once)", flush=True)
        pretrain(world, model, PretrainConfig(), progress=False)  # the demo's model.tiny
    return model, world


def finals(a: ModelAttack) -> dict[tuple[str, float], float]:
    return {(f.v, r.lr): r.epochs[-1].v_acc for f in a.folds for r in f.runs}


def timed(fn: Any) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", type=Path, default=Path("runs/bench-models"))
    ap.add_argument("--demo", type=Path, default=Path("runs/demo"))
    ap.add_argument("--folds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    found = find_demo(args.demo)
    model_dir, world = found if found is not None else demo_models(args.models)
    ds = load_dataset(world)
    scoring = scoring_for(ds, batch_size=128)
    # the demo's RTT (configs/demo.yaml), on the first --folds folds
    common: dict[str, Any] = dict(
        epochs=args.epochs, batch_size=16, optimizer="adamw", text_format="auto",
        holdout_fraction=0.2, retain_eval="none",
    )  # fmt: skip
    folds = list(ds.splits)[: args.folds]
    rtt_cfg = RTTConfig(**common, folds=folds)  # RTT's tiny default lrs
    lora = LoraRTTSpec(rank=args.rank, **common).resolved(seed=0)  # LoRA's tiny default lrs
    print(f"model {model_dir}\nworld {world}")
    print(
        f"{len(folds)} folds x 3 lrs x {args.epochs} epochs, batch 16, AdamW; LoRA rank "
        f"{args.rank} on {lora['lora']['target_modules']}, lrs {lora['lrs']}; RTT lrs {rtt_cfg.lrs}"
    )

    def run_lora(batched: bool) -> ModelAttack:
        model, tok = load_model(model_dir, device="cpu")
        ctx = AttackContext(model, tok, ds, scoring, folds=folds)
        return LoraRTT().run({**lora, "batched": batched}, ctx)

    def run_rtt() -> ModelAttack:
        model, tok = load_model(model_dir, device="cpu")
        return attack_model(model, tok, ds, rtt_cfg, scoring)

    batched, t_b, c_b = timed(lambda: run_lora(True))
    alone, t_a, c_a = timed(lambda: run_lora(False))
    full, t_f, c_f = timed(run_rtt)
    fb, fa, ff = finals(batched), finals(alone), finals(full)
    d = [abs(fb[k] - fa[k]) for k in fa]
    mean = lambda x: sum(x.values()) / len(x)  # noqa: E731
    print(
        f"final V accuracy, mean over {len(fa)} runs: LoRA batched {mean(fb):.3f}, "
        f"LoRA one by one {mean(fa):.3f} (|diff| per run: max {max(d):.3f}), "
        f"full RTT {mean(ff):.3f}"
    )
    print(f"LoRA-RTT, adapters batched:    {t_b:6.1f} s (CPU {c_b:.1f} s)")
    print(f"LoRA-RTT, adapters one by one: {t_a:6.1f} s (CPU {c_a:.1f} s)")
    print(f"RTT, full fine-tuning:         {t_f:6.1f} s (CPU {c_f:.1f} s)")
    print(f"LoRA batched / full RTT time: {t_b / t_f:.2f}")
    print(f"LoRA one by one / full RTT time: {t_a / t_f:.2f}")
    print(f"CPU time, LoRA one by one / batched: {c_a / c_b:.2f}")
    print(f"speedup: {t_a / t_b:.2f}")


if __name__ == "__main__":
    main()
