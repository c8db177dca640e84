"""GPU memory of one RTT training step on Llama-3-8B per precision: computed, not measured.

Prints the table of docs/performance.md: weights, gradients, optimizer state,
compensation, activations, the weight snapshot RTT keeps, their sum, and
whether the sum fits an 80 GB and a 141 GB GPU.  The accounting follows what
rtteval runs (``rtteval.training.loop``): Lion's state, the temporaries of its step,
HF Llama's saved activations with SDPA attention, the fp32 logits
``forward_logits`` returns and the log-softmax of the loss.

    python benchmarks/memory_8b.py [--batch 4] [--seq 512] [--optimizer lion] [--lora]

``--lora`` prints LoRA-RTT's table instead (:func:`lora_rows`): a frozen bf16
base and G stacked adapters (``rtteval.attacks.lora_rtt.LoraEnsemble``) at
ranks 16 and 128; :func:`lora_memory_gib` is one cell of it, for
``benchmarks/gpu_rtt.py`` to compare with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse

# Llama-3-8B (config.json of meta-llama/Meta-Llama-3-8B)
VOCAB, HIDDEN, LAYERS, INTER, KV = 128256, 4096, 32, 14336, 1024
PARAMS = (
    2 * VOCAB * HIDDEN  # embeddings and the untied lm_head
    + LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV + 3 * HIDDEN * INTER + 2 * HIDDEN)
    + HIDDEN
)
LARGEST = VOCAB * HIDDEN  # the embedding: the per-parameter temporaries' size
GIB = 2**30
#: What a card leaves to tensors (CUDA context and allocator slack off the top).
USABLE = {"80 GB": 78.0, "141 GB": 138.0}

#: precision -> (weight bytes, gradient bytes, compensated)
MODES = {
    "fp32": (4, 4, False),
    "bf16": (2, 2, True),
    "bf16-pure": (2, 2, False),
    "fp16": (2, 2, False),
}


def activations(tokens: int, checkpointing: bool) -> float:
    """Bytes saved for backward (bf16 compute), plus the logits and their loss."""
    h, kv, i = HIDDEN, KV, INTER
    # per token and layer: two RMSNorms (fp32 input + bf16 output each), q/k/v/output of
    # attention and the reshaped output, the MLP's gate, up, silu(gate) and product
    layer = 2 * (4 * h + 2 * h) + 2 * (2 * h + 2 * kv) + 2 * h + 4 * 2 * i
    logits = tokens * VOCAB * (2 + 4 + 4)  # bf16 logits, fp32 copy, fp32 log-softmax
    if checkpointing:  # each layer's input, and one layer recomputed at a time
        return tokens * (LAYERS * 2 * h + layer) + logits
    return tokens * LAYERS * layer + logits


def rows(batch: int, seq: int, optimizer: str) -> list[dict[str, object]]:
    tokens = batch * seq
    out = []
    for mode, (wb, gb, comp) in MODES.items():
        for ckpt in (False, True):
            if optimizer == "lion":
                state_b = 4 if (mode == "fp32" or comp) else wb  # momentum
                # foreach step: one update buffer per parameter at once; compensated: per tensor
                step_tmp = PARAMS * state_b if not comp else 3 * 4 * LARGEST
            else:  # adamw: two moments
                state_b = 8 if (mode == "fp32" or comp) else 2 * wb
                step_tmp = PARAMS * wb if not comp else 4 * 4 * LARGEST
            r = {
                "precision": mode,
                "checkpointing": "on" if ckpt else "off",
                "weights": PARAMS * wb,
                # autocast keeps a bf16 copy of each fp32 matrix for backward
                "autocast copy": PARAMS * 2 if mode == "fp32" else 0,
                "gradients": PARAMS * gb,
                "optimizer state": PARAMS * state_b,
                "compensation": PARAMS * 4 if comp else 0,
                "activations": activations(tokens, ckpt),
                "RTT snapshot": PARAMS * 2,  # the model as loaded (bf16 on a GPU)
            }
            backward = sum(v for k, v in r.items() if isinstance(v, (int, float)))
            step = backward - r["activations"] - r["autocast copy"] + step_tmp
            r["peak"] = max(backward, step)
            out.append(r)
    return out


#: LoRA's "all-linear" targets per layer, (in, out): q, k, v, o, gate, up, down.
LORA_TARGETS = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN),
                (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)]  # fmt: skip


def lora_params(rank: int) -> int:
    """One adapter's parameters: A (rank x in) and B (out x rank) per target, every layer."""
    return LAYERS * sum(rank * (i + o) for i, o in LORA_TARGETS)


def lora_row(
    rank: int, adapters: int, *, batch: int = 4, seq: int = 512, checkpointing: bool = False
) -> dict[str, float]:
    """Bytes of one LoRA-RTT training step with ``adapters`` stacked adapters (precision bf16).

    As ``LoraEnsemble`` allocates: the frozen bf16 base; per adapter its bf16
    weights and gradients (one flat buffer each) and KahanAdamW's fp32 state
    (two moments and the Kahan residual, 12 bytes per parameter); peft's own
    adapter once; the base run on ``adapters`` x batch rows (the ensemble
    repeats the batch per member), so activations and logits scale with G,
    plus each target's rank-wide intermediate; ``relearn``'s snapshot of the
    whole model (the bf16 base with the adapters).  The step works member by
    member: its temporaries are four fp32 buffers of one adapter.
    """
    n = lora_params(rank)
    tokens = batch * seq
    r = {
        "base (frozen)": PARAMS * 2,
        "adapters": (adapters + 1) * n * 2,
        "gradients": adapters * n * 2,
        "optimizer state": adapters * n * 12,
        "activations": activations(adapters * tokens, checkpointing)
        + adapters * tokens * LAYERS * len(LORA_TARGETS) * rank * 2,
        "RTT snapshot": PARAMS * 2 + n * 2,
    }
    backward = sum(r.values())
    step = backward - r["activations"] + 4 * 4 * n
    r["peak"] = max(backward, step)
    return r


def lora_memory_gib(
    rank: int, adapters: int, *, batch: int = 4, seq: int = 512, checkpointing: bool = False
) -> float:
    """Computed peak GiB of a LoRA-RTT step on Llama-3-8B (:func:`lora_row`'s ``peak``)."""
    return lora_row(rank, adapters, batch=batch, seq=seq, checkpointing=checkpointing)["peak"] / GIB


def print_lora(batch: int, seq: int) -> None:
    cols = ["base (frozen)", "adapters", "gradients", "optimizer state", "activations",
            "RTT snapshot", "peak"]  # fmt: skip
    print(
        f"Llama-3-8B LoRA-RTT (all-linear targets, bf16, KahanAdamW), batch {batch} x {seq} "
        "tokens per adapter; GiB, computed"
    )
    head = ["rank", "adapters", "adapter params", "checkpointing", *cols,
            *(f"fits {k}" for k in USABLE)]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for rank in (16, 128):
        for g in (1, 6, 12):
            for ckpt in (False, True):
                r = lora_row(rank, g, batch=batch, seq=seq, checkpointing=ckpt)
                fits = ["yes" if r["peak"] / GIB <= v else "no" for v in USABLE.values()]
                cells = [f"{r[c] / GIB:.1f}" for c in cols]
                print(f"| {rank} | {g} | {lora_params(rank) / 1e6:.0f}M | {'on' if ckpt else 'off'} | "
                      + " | ".join(cells + fits) + " |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--optimizer", choices=["lion", "adamw"], default="lion")
    ap.add_argument("--lora", action="store_true", help="LoRA-RTT's table (adapters x rank)")
    args = ap.parse_args()
    if args.lora:
        print_lora(args.batch, args.seq)
        return
    table = rows(args.batch, args.seq, args.optimizer)
    cols = ["weights", "autocast copy", "gradients", "optimizer state", "compensation",
            "activations", "RTT snapshot", "peak"]  # fmt: skip
    print(
        f"Llama-3-8B ({PARAMS / 1e9:.2f}B parameters), {args.optimizer}, batch {args.batch} x "
        f"{args.seq} tokens; GiB, computed"
    )
    head = ["precision", "checkpointing", *cols, *(f"fits {k}" for k in USABLE)]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in table:
        fits = ["yes" if r["peak"] / GIB <= v else "no" for v in USABLE.values()]  # type: ignore[operator]
        cells = [f"{r[c] / GIB:.1f}" for c in cols]  # type: ignore[operator]
        print(f"| {r['precision']} | {r['checkpointing']} | " + " | ".join(cells + fits) + " |")


if __name__ == "__main__":
    main()
