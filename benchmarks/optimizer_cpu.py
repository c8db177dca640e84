"""Lion for bf16 weights: rtteval's compensated Lion against torch-optimi's Kahan-summed Lion.

Two questions decide which one the ``bf16`` precision uses (docs/performance.md):

1. speed: seconds per optimizer step on CPU, on the parameters of a tiny
   preset (rtteval's fp32 Lion is the baseline);
2. whether every update arrives: the share of the fp32 change that the weights
   carry after many same-sign steps at the paper's smallest RTT lr (1e-7), on
   weights of magnitude 0.02 (a typical Llama matrix entry) and 1.0 (RMSNorm).

    pip install torch-optimi==0.3.3   # only this benchmark needs it
    python benchmarks/optimizer_cpu.py [--preset tiny-1m] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from rtteval.training.optim import Lion


def _params(preset: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    from rtteval.models import build_tiny_model, train_word_tokenizer

    tok = train_word_tokenizer([f"w{i}" for i in range(2000)])
    model = build_tiny_model(preset, tok, seed=0)
    params = [torch.nn.Parameter(p.detach().to(dtype)) for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    return params


def _time(make, preset: str, dtype: torch.dtype, steps: int) -> float:
    params = _params(preset, dtype)
    opt = make(params)
    for _ in range(3):  # state allocation and warm caches
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps


def _carried(make, w0: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """The weights (plus any compensation) after ``steps`` same-sign steps."""
    p = torch.nn.Parameter(w0.clone())
    opt = make([p], lr)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    state = opt.state[p]
    comp = state.get("comp", state.get("kahan_comp"))  # rtteval's fp32, torch-optimi's bf16
    return p.detach().float() + (comp.float() if comp is not None else 0.0)


def _kept(make, magnitude: float, lr: float, steps: int) -> float:
    """The change carried, as a share of fp32 Lion's from the same (bf16-representable) start."""
    w0 = torch.full((4096,), magnitude).bfloat16()
    fp32 = w0.float() - _carried(lambda ps, lr: Lion(ps, lr=lr), w0.float(), lr, steps)
    return float((w0.float() - _carried(make, w0, lr, steps)).mean() / fp32.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-1m")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import optimi
    except ImportError:
        raise SystemExit("needs torch-optimi: pip install torch-optimi==0.3.3") from None

    bf16 = torch.bfloat16
    n = sum(p.numel() for p in _params(args.preset, torch.float32))
    print(f"{args.preset}: {n:,} parameters, {args.steps} steps, {args.threads} thread(s)")
    rows = {
        "rtteval Lion, fp32 weights": _time(lambda ps: Lion(ps, lr=1e-4), args.preset,
                                            torch.float32, args.steps),
        "rtteval Lion, bf16 + fp32 compensation": _time(
            lambda ps: Lion(ps, lr=1e-4, compensate=True), args.preset, bf16, args.steps),
        "torch-optimi Lion, bf16 + bf16 Kahan (foreach)": _time(
            lambda ps: optimi.Lion(ps, lr=1e-4, kahan_sum=True, foreach=True), args.preset, bf16,
            args.steps),
        "torch-optimi Lion, bf16 + bf16 Kahan (for-loop)": _time(
            lambda ps: optimi.Lion(ps, lr=1e-4, kahan_sum=True, foreach=False), args.preset, bf16,
            args.steps),
    }  # fmt: skip
    base = rows["rtteval Lion, bf16 + fp32 compensation"]
    print("| optimizer | ms/step | time / rtteval compensated |")
    print("| --- | --- | --- |")
    for name, sec in rows.items():
        print(f"| {name} | {sec * 1e3:.2f} | {sec / base:.2f} |")

    print("\nshare of fp32 Lion's change carried after same-sign steps at lr 1e-7")
    print("| optimizer | |w| | 300 steps | 3000 steps |")
    print("| --- | --- | --- | --- |")
    makers = {
        "rtteval Lion, fp32 compensation": lambda ps, lr: Lion(ps, lr=lr, compensate=True),
        "torch-optimi Lion, bf16 Kahan": lambda ps, lr: optimi.Lion(ps, lr=lr, kahan_sum=True),
        "bf16-pure (no compensation)": lambda ps, lr: Lion(ps, lr=lr),
    }
    for name, make in makers.items():
        for mag in (0.02, 1.0):
            kept = [_kept(make, mag, 1e-7, s) for s in (300, 3000)]
            print(f"| {name} | {mag:g} | {kept[0]:.3f} | {kept[1]:.3f} |")


if __name__ == "__main__":
    main()
