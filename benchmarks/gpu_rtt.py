"""GPU benchmark: RTT on an 8B-shaped model, rtteval versus the paper-shaped loop (issue 6, items 3-4).

    python benchmarks/gpu_rtt.py --out $OUT/gpu_rtt.json      # one H100/H200; sized for < 8 min
    python benchmarks/gpu_rtt.py --smoke                       # tiny model on CPU, seconds

The model is Llama-3-8B-shaped (hidden 4096, MLP 14336, 32 layers, 32 heads,
8 KV heads, vocab 128256, rope theta 500000, untied head) with random weights,
built directly on the GPU in bf16: nothing is downloaded.  Token ids are
random, with lengths drawn uniformly from [--min-len, --max-len] (default
90..128), so padding and attention masks are realistic.  What is measured, in
this order (each result is printed and written to the JSON as soon as it
exists, so a run cut short still leaves its numbers):

1. bf16 matmul peak: 8192^3 products timed with CUDA events; the MFU
   denominator.
2. Training step, batch 4 (the paper's shape): (a) the baseline, as in
   benchmarks/paper_loop.py: shuffled batches padded to the longest, the HF
   model's own loss (``labels=``), Lion stepped parameter by parameter in a
   Python loop; (b) rtteval: ``rtteval.training.loop.train`` itself (foreach Lion,
   ``lm_loss_fn`` through ``batch_logits``, bf16 autocast), on batches from
   ``rtteval.training.loop.make_batches`` (length bucketing).  Same lr, same Lion
   betas, no clipping, no warmup, constant lr: the same math.
3. MCQ evaluation forward passes under ``torch.inference_mode``: batch 4
   (paper-shaped, all logits copied to the CPU as the paper's code scores) and
   --eval-batch (default 64) through ``rtteval.scoring.forward_logits`` with
   the last position's letter logits picked on the device and copied, exactly
   what ``score_letters`` does (``letters``); the same large batch copying
   every logit (``copy``) and with no copy (``forward``); and a
   last-position-only variant (``logits_to_keep=1``).
4. The estimated wall time (rtteval: its bs4 step and ``letters`` evaluation) of the full Years RTT sweep for an 8B model (5
   folds x 6 lrs x 6 epochs, 632 training questions per fold at batch 4 =
   158 steps per epoch, V = 158 questions evaluated after every epoch) for
   both, and their ratio.
5. rtteval's step at batch 4 while a copy of the weights is held on the GPU,
   as ``attack_model``'s ``snapshot_state`` does (does RTT as run fit?); at
   batches 16 and 32 (throughput only: a different batch size is different
   math).
6. rtteval's step at batch 4 under each training precision in --precisions
   (default fp32, bf16, bf16-pure, fp16; docs/performance.md), then the same
   with gradient checkpointing: time, peak memory, the lost-update warnings
   at --lr.  ``train`` casts the weights to the precision's dtype; they are
   cast back to the build dtype after each (lossless from bf16).  Then, with
   --compile, on ``torch.compile(model, dynamic=True)``, last.
7. LoRA-RTT's step (between the precisions without and with checkpointing):
   for each RANKxADAPTERS in --lora (default ranks 16 and 128 with 1, 6 and
   12 adapters), peft adapters on every projection of the frozen model,
   stacked as ``lora_rtt`` stacks its lr grid (``LoraEnsemble``), AdamW, the
   default precision, batch 4 per adapter: time, tokens/s over all
   adapters, peak memory (checked against benchmarks/memory_8b.py's
   computed LoRA table in docs/performance.md).

FLOPs (stated in the JSON under ``flops``): N = the parameters that do matrix
products = all parameters minus the input embedding (an embedding lookup does
no matmul; Llama-3-8B's output head is untied and is counted).  Training:
6 * N * tokens; forward: 2 * N * tokens; the last-position variant counts
the head only for the last position.  "tokens" are real (non-padding) tokens,
so padding is counted as waste; padded-token numbers are reported alongside.
Attention score/value products (12 * layers * hidden * seq per token for
training, under 0.5% at these lengths) are excluded; their share is in the JSON.

Every measurement: 3 warm-up steps, then --steps timed steps (default 10),
``torch.cuda.synchronize`` around the timed region; mean step time.  Peak
memory (``torch.cuda.max_memory_allocated``) per measurement.  An OOM is
caught, printed and recorded, and the next measurement runs.  Memory at
batch 4 (computed in benchmarks/memory_8b.py): the default precision on a
GPU, ``bf16``, holds 16 GB bf16 weights + 16 GB grads + 32 GB fp32 Lion
momentum + 32 GB fp32 compensation; with the 16 GB snapshot that needs a
141 GB H200, not an 80 GB H100 (``bf16-pure`` fits one).

The last two lines are ``speedup_step_bs4: X`` (rtteval / baseline real
tokens/s at batch 4) and ``mfu_eval: Y`` (forward at --eval-batch, no copy).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import rtteval  # noqa: F401
except ImportError:  # a bare device machine: use the checkout's sources
    sys.path.insert(0, str(HERE.parent / "src"))

from paper_loop import PerParamLion  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rtteval.models.loading import snapshot_state  # noqa: E402
from rtteval.scoring import forward_logits, position_ids_from_mask  # noqa: E402
from rtteval.training.batching import make_batches  # noqa: E402
from rtteval.training.config import TrainConfig  # noqa: E402
from rtteval.training.loop import train  # noqa: E402
from rtteval.training.losses import lm_loss_fn  # noqa: E402
from rtteval.training.precision import (  # noqa: E402
    PRECISIONS,
    cast_for_precision,
    cast_parameters,
)

LLAMA3_8B: dict[str, Any] = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
SMOKE: dict[str, Any] = dict(
    LLAMA3_8B,
    hidden_size=64,
    intermediate_size=224,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=512,
)

#: Dense bf16 tensor-core peak from the data sheets (TFLOP/s), for a second MFU column.
SPEC_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]

#: The Years sweep (paper's RTT on Llama-3-8B): folds, lrs, epochs, T and V sizes.
SWEEP = dict(folds=5, lrs=6, epochs=6, train_questions=632, v_questions=158, batch_size=4)

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def _mfu_mem(out: dict) -> tuple[str, str]:
    """MFU and peak memory of a measurement as printed ("n/a" where not measured)."""
    mfu = f"{out['mfu']:.3f}" if out["mfu"] is not None else "n/a"
    mem = f"{out['peak_mem_gib']:.1f} GiB" if out["peak_mem_gib"] is not None else "n/a"
    return mfu, mem


class Recorder:
    """The results dict, rewritten atomically to ``path`` after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"errors": []}

    def put(self, section: str, key: str | None, value: Any) -> None:
        if key is None:
            self.data[section] = value
        else:
            self.data.setdefault(section, {})[key] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".gpu_rtt.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=2)
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- setup


def build_model(overrides: dict[str, Any], device: torch.device, dtype: torch.dtype):
    """Random-weight Llama built directly on ``device`` in ``dtype`` (no CPU init, no download)."""
    config = LlamaConfig(**overrides, attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model, config


def random_seqs(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` random token sequences with lengths uniform in [lo, hi]; id 0 is kept for padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (n_tok,), generator=g).tolist() for n_tok in lengths]


def paper_batches(seqs: Sequence[Sequence[int]], batch_size: int, seed: int) -> list[dict]:
    """The paper loop's batches: a shuffled pass, padded (right) to the longest of each batch."""
    data = list(seqs)
    random.Random(seed).shuffle(data)
    out = []
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def left_padded(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, as ``ScoringConfig.padding_side`` defaults to."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, width - len(s) :] = torch.tensor(s)
        mask[j, width - len(s) :] = 1
    return ids, mask


def take(batches: Sequence[dict], start: int, n: int) -> list[dict]:
    """``n`` batches from ``start``, cycling if the epoch is shorter."""
    return [batches[(start + i) % len(batches)] for i in range(n)]


def pad_stats(batches: Sequence[dict]) -> tuple[int, int]:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    return real, padded


# --------------------------------------------------------------------------- bench


class Bench:
    def __init__(self, args: argparse.Namespace, rec: Recorder) -> None:
        self.args, self.rec = args, rec
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.cuda = self.device.type == "cuda"
        self.peak_flops: float | None = None
        self.spec_flops: float | None = None

    # -- helpers

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_mem(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_mem_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def cleanup(self, model: torch.nn.Module | None = None) -> None:
        if model is not None:
            model.zero_grad(set_to_none=True)
            model.eval()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def time_left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - T0)

    def guarded(self, name: str, fn: Callable[[], dict], model=None, need_s: float = 0.0):
        """Run one measurement; an OOM or error is printed, recorded, and the run goes on."""
        if self.time_left() < need_s:
            log(f"{name}: SKIPPED (time budget: {self.time_left():.0f} s left of --budget-s)")
            self.rec.data["errors"].append({"what": name, "error": "skipped: time budget"})
            self.rec.save()
            return None
        log(f"{name}: running")
        try:
            return fn()
        except torch.OutOfMemoryError as e:
            first = str(e).splitlines()[0] if str(e) else "out of memory"
            log(f"{name}: OOM ({first[:200]}); continuing with the next measurement")
            self.rec.data["errors"].append({"what": name, "error": "OOM", "detail": first})
        except Exception as e:  # one broken measurement must not lose the others
            log(f"{name}: ERROR {type(e).__name__}: {e}; continuing")
            traceback.print_exc()
            self.rec.data["errors"].append(
                {"what": name, "error": type(e).__name__, "detail": str(e)[:500]}
            )
        finally:
            self.cleanup(model)
        self.rec.save()
        return None

    def rates(self, flops: float, seconds: float) -> dict[str, float | None]:
        achieved = flops / seconds
        return {
            "tflops": achieved / 1e12,
            "mfu": achieved / self.peak_flops if self.peak_flops else None,
            "mfu_vs_spec": achieved / self.spec_flops if self.spec_flops else None,
        }

    # -- 1. matmul peak

    def measure_peak(self) -> dict:
        n = 1024 if self.args.smoke else self.args.peak_n
        dtype = self.dtype
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        c = torch.empty(n, n, device=self.device, dtype=dtype)
        iters = 3 if self.args.smoke else 20
        for _ in range(3):
            torch.mm(a, b, out=c)
        self.sync()
        best = math.inf
        for _ in range(3):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    torch.mm(a, b, out=c)
                end.record()
                end.synchronize()
                secs = start.elapsed_time(end) / 1e3
            else:
                t = time.perf_counter()
                for _ in range(iters):
                    torch.mm(a, b, out=c)
                secs = time.perf_counter() - t
            best = min(best, secs)
        del a, b, c
        self.peak_flops = 2 * n**3 * iters / best
        name = torch.cuda.get_device_name() if self.cuda else "cpu"
        spec = next((v for k, v in SPEC_TFLOPS if k in name), None)
        self.spec_flops = spec * 1e12 if spec and self.cuda else None
        out = {
            "n": n,
            "dtype": str(dtype).removeprefix("torch."),
            "iters": iters,
            "tflops": self.peak_flops / 1e12,
            "spec_tflops": spec if self.cuda else None,
            "method": "best of 3 x (iters products of n x n x n, timed with CUDA events)",
        }
        log(
            f"matmul peak ({n}^3 {out['dtype']}): {out['tflops']:.1f} TFLOP/s"
            + (f"  (data-sheet dense peak {spec:.0f})" if out["spec_tflops"] else "")
        )
        return out

    # -- 2. training steps

    def train_record(
        self, label: str, batches: Sequence[dict], seconds: float, steps: int, losses: list[float]
    ) -> dict:
        real, padded = pad_stats(batches)
        step_s = seconds / steps
        r = self.rates(6 * self.n_matmul * real, seconds)
        out = {
            "batch_size": batches[0]["input_ids"].shape[0],
            "warmup_steps": self.args.warmup,
            "timed_steps": steps,
            "step_s_mean": step_s,
            "tokens": real,
            "padded_tokens": padded,
            "padding_efficiency": real / padded,
            "tokens_per_s": real / seconds,
            "padded_tokens_per_s": padded / seconds,
            **r,
            "mfu_padded_tokens": (
                6 * self.n_matmul * padded / seconds / self.peak_flops if self.peak_flops else None
            ),
            "peak_mem_gib": self.peak_mem_gib(),
            "loss_first": round(losses[0], 4) if losses else None,
            "loss_last": round(losses[-1], 4) if losses else None,
        }
        mfu, mem = _mfu_mem(out)
        log(
            f"{label}: {step_s * 1e3:.1f} ms/step, {out['tokens_per_s']:.0f} tokens/s "
            f"(padding eff. {out['padding_efficiency']:.2f}), {out['tflops']:.1f} TFLOP/s, "
            f"MFU {mfu}, peak mem {mem}, loss {out['loss_first']} -> {out['loss_last']}"
        )
        return out

    def baseline_step_bench(self, batch_size: int) -> dict:
        """The paper loop's step: HF loss, per-parameter Python Lion, no autocast."""
        model, args = self.model, self.args
        batches = paper_batches(self.seqs, batch_size, seed=args.seed)
        warm = take(batches, 0, args.warmup)
        timed = take(batches, args.warmup, args.steps)
        opt = PerParamLion(model.parameters(), lr=args.lr)
        model.train()
        self.reset_mem()
        losses: list[float] = []

        def step(b: dict) -> None:
            ids = b["input_ids"].to(self.device)
            mask = b["attention_mask"].to(self.device)
            labels = b["labels"].to(self.device)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(out.loss.detach())

        for b in warm:
            step(b)
        self.sync()
        losses.clear()
        t = time.perf_counter()
        for b in timed:
            step(b)
        self.sync()
        seconds = time.perf_counter() - t
        rec = self.train_record(
            f"baseline bs{batch_size}", timed, seconds, len(timed), [float(x) for x in losses]
        )
        epoch_real, epoch_padded = pad_stats(batches)
        rec["epoch_padding_efficiency"] = epoch_real / epoch_padded
        rec["what"] = "paper_loop shape: HF labels= loss, PerParamLion, pad to longest, no autocast"
        return rec

    def rtteval_step_bench(
        self,
        batch_size: int,
        compiled: bool = False,
        snapshot: bool = False,
        precision: str = "auto",
        checkpointing: bool = False,
    ) -> dict:
        """rtteval's step: ``rtteval.training.loop.train`` itself on ``make_batches`` (bucketed) batches.

        ``snapshot`` holds a copy of the weights on the device meanwhile, as
        ``attack_model`` does (``snapshot_state``), to see whether RTT as run fits.
        ``precision`` / ``checkpointing``: the TrainConfig's; the weights are cast
        back to the build dtype afterwards, so later measurements see the same model.
        """
        args = self.args
        model = self.model
        held = snapshot_state(model) if snapshot else None
        if compiled:
            model = torch.compile(self.model, dynamic=True)
        batches = make_batches(self.seqs, batch_size, 0, seed=args.seed)
        warm = take(batches, 0, args.warmup)
        timed = take(batches, args.warmup, args.steps)
        cfg = TrainConfig(
            lr=args.lr,
            epochs=1,
            optimizer="lion",
            grad_clip=None,
            schedule="constant",
            warmup_steps=0,
            eval_every_epochs=None,
            autocast="auto",
            seed=args.seed,
            precision=precision,  # type: ignore[arg-type]
            gradient_checkpointing=checkpointing,
        )
        self.reset_mem()
        t = time.perf_counter()
        train(model, lambda _epoch: warm, lm_loss_fn, cfg)
        self.sync()
        if compiled:
            log(
                f"compiled warm-up ({len(warm)} steps incl. compilation): {time.perf_counter() - t:.1f} s"
            )
        t = time.perf_counter()
        try:
            res = train(model, lambda _epoch: timed, lm_loss_fn, cfg)
            self.sync()
            seconds = time.perf_counter() - t
        finally:
            cast_parameters(self.model, [self.dtype] * len(list(self.model.parameters())))
        label = f"rtteval bs{batch_size}" + (" compiled" if compiled else "")
        label += " + weight snapshot" if held is not None else ""
        label += f" precision {res.precision}" if precision != "auto" else ""
        label += " + checkpointing" if checkpointing else ""
        rec = self.train_record(label, timed, seconds, res.steps, res.losses)
        rec["weight_snapshot_on_device"] = held is not None
        rec["precision"] = res.precision
        rec["gradient_checkpointing"] = checkpointing
        rec["lost_update_warnings"] = res.warnings
        del held
        epoch_real, epoch_padded = pad_stats(batches)
        rec["epoch_padding_efficiency"] = epoch_real / epoch_padded
        rec["what"] = (
            "rtteval.training.loop.train: foreach Lion, lm_loss_fn/batch_logits, bf16 autocast, "
            "make_batches length bucketing" + (", torch.compile(dynamic=True)" if compiled else "")
        )
        if compiled:
            torch._dynamo.reset()
        return rec

    def lora_step_bench(self, rank: int, adapters: int) -> dict:
        """LoRA-RTT's step: ``adapters`` LoRA adapters of ``rank`` on the frozen model, as one batch.

        What ``lora_rtt`` trains (``attacks/lora_rtt.py``): peft adapters on every
        attention and MLP projection, stacked into one :class:`LoraEnsemble` (each
        adapter sees the same batch of 4), AdamW, the default precision.  The
        frozen base needs no weight gradients, so a step costs about
        4 * n_matmul FLOPs per token and adapter (forward + activation gradients);
        the MFU column uses that.  The model is unwrapped afterwards.
        """
        from rtteval.attacks.lora_rtt import ALL_LINEAR, LoraEnsemble, attach_lora

        args = self.args
        peft_model = attach_lora(
            self.model,
            {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "target_modules": ALL_LINEAR},
            seed=args.seed,
        )
        precision = cast_for_precision(peft_model, "auto")  # as relearn() does: bf16 on a GPU
        ens = LoraEnsemble(peft_model, [2e-4] * adapters)
        try:
            adapter_params = ens._flat.numel()
            batches = make_batches(self.seqs, 4, 0, seed=args.seed)
            warm = take(batches, 0, args.warmup)
            timed = take(batches, args.warmup, args.steps)
            cfg = TrainConfig(
                lr=2e-4,
                epochs=1,
                optimizer="adamw",
                grad_clip=None,
                schedule="constant",
                warmup_steps=0,
                eval_every_epochs=None,
                autocast="auto",
                seed=args.seed,
                precision=precision,  # type: ignore[arg-type]
            )
            self.reset_mem()
            train(ens, lambda _epoch: warm, lm_loss_fn, cfg)
            self.sync()
            t = time.perf_counter()
            res = train(ens, lambda _epoch: timed, lm_loss_fn, cfg)
            self.sync()
            seconds = time.perf_counter() - t
            steps = res[0].steps
            real, padded = pad_stats(timed)
            r = self.rates(4 * self.n_matmul * real * adapters, seconds)
            out = {
                "rank": rank,
                "adapters": adapters,
                "batch_size_per_adapter": 4,
                "timed_steps": steps,
                "step_s_mean": seconds / steps,
                "adapter_params_total": adapter_params,
                "adapter_dtype": str(ens._flat.dtype).removeprefix("torch."),
                "precision": res[0].precision,
                "tokens_per_s": real * adapters / seconds,
                "tokens_per_s_per_adapter": real / seconds,
                **r,
                "flops_per_token": "4 * n_matmul per adapter (frozen base: no weight gradients)",
                "peak_mem_gib": self.peak_mem_gib(),
                "loss_first": round(res[0].losses[0], 4) if res[0].losses else None,
                "loss_last": round(res[0].losses[-1], 4) if res[0].losses else None,
                "what": "rtteval.attacks.lora_rtt: attach_lora + LoraEnsemble + training.loop.train",
            }
        finally:
            ens.close()
            peft_model.unload()
        mfu, mem = _mfu_mem(out)
        log(
            f"LoRA r{rank} x{adapters}: {out['step_s_mean'] * 1e3:.1f} ms/step, "
            f"{out['tokens_per_s']:.0f} tokens/s over all adapters, MFU {mfu}, peak mem {mem}"
        )
        return out

    # -- 3. evaluation

    def eval_bench(self, batch_size: int, mode: str) -> dict:
        """``mode``: ``letters`` (forward_logits, the last position's letter logits picked on
        the device, then .cpu(): what score_letters does), ``copy`` (all logits to the CPU, as
        the paper's code scores), ``forward`` (no copy), ``last`` (logits_to_keep=1)."""
        model, args = self.model, self.args
        model.eval()
        seqs = random_seqs(batch_size, args.min_len, args.max_len, self.vocab, args.seed + 7)
        ids, mask = left_padded(seqs)
        real, padded = int(mask.sum()), mask.numel()
        n_iter = args.eval_steps
        letter_ids = torch.arange(4) + 32  # any four ids: the cost does not depend on which

        @torch.inference_mode()
        def run() -> torch.Tensor:
            if mode == "last":
                d_ids, d_mask = ids.to(self.device), mask.to(self.device)
                out = model(
                    input_ids=d_ids,
                    attention_mask=d_mask,
                    position_ids=position_ids_from_mask(d_mask),
                    use_cache=False,
                    logits_to_keep=1,
                )
                return out.logits[:, -1, :].float().cpu()
            logits = forward_logits(model, ids, mask)
            if mode == "letters":
                return logits[:, -1, letter_ids.to(logits.device)].cpu()
            if mode == "copy":
                logits = logits.cpu()
            return logits[:, -1, :]

        self.reset_mem()
        for _ in range(2):
            run()
        self.sync()
        t = time.perf_counter()
        for _ in range(n_iter):
            run()
        self.sync()
        seconds = time.perf_counter() - t
        if mode == "last":
            flops = 2 * (self.n_matmul - self.n_head) * real + 2 * self.n_head * batch_size
        else:
            flops = 2 * self.n_matmul * real
        r = self.rates(flops * n_iter, seconds)
        out = {
            "batch_size": batch_size,
            "mode": mode,
            "iters": n_iter,
            "batch_s_mean": seconds / n_iter,
            "tokens_per_batch": real,
            "padded_tokens_per_batch": padded,
            "tokens_per_s": real * n_iter / seconds,
            **r,
            "peak_mem_gib": self.peak_mem_gib(),
        }
        mfu, mem = _mfu_mem(out)
        log(
            f"eval bs{batch_size} {mode}: {out['batch_s_mean'] * 1e3:.1f} ms/batch, "
            f"{out['tokens_per_s']:.0f} tokens/s, {out['tflops']:.1f} TFLOP/s, MFU {mfu}, "
            f"peak mem {mem}"
        )
        return out

    # -- 4. sweep estimate

    def sweep_estimate(self) -> dict | None:
        tr = self.rec.data.get("train", {})
        ev = self.rec.data.get("eval", {})
        s = SWEEP
        steps = math.ceil(s["train_questions"] / s["batch_size"])
        runs_epochs = s["folds"] * s["lrs"] * s["epochs"]
        out: dict[str, Any] = {"sweep": dict(s, steps_per_epoch=steps)}
        for side, train_key, eval_key in (
            ("baseline", "baseline_bs4", "bs4_copy"),
            ("rtteval", "rtteval_bs4", f"bs{self.args.eval_batch}_letters"),
        ):
            t, e = tr.get(train_key), ev.get(eval_key)
            if t is None:
                continue
            train_s = runs_epochs * steps * t["step_s_mean"]
            eval_s = None
            if e is not None:
                eval_s = (
                    runs_epochs * math.ceil(s["v_questions"] / e["batch_size"]) * e["batch_s_mean"]
                )
            out[side] = {
                "train_s": train_s,
                "v_eval_s": eval_s,
                "total_s": train_s + (eval_s or 0.0),
                "total_h": (train_s + (eval_s or 0.0)) / 3600,
                "from": [train_key, eval_key if e is not None else None],
            }
        if "baseline" not in out or "rtteval" not in out:
            return None
        out["ratio_baseline_over_rtteval"] = out["baseline"]["total_s"] / out["rtteval"]["total_s"]
        out["excludes"] = (
            "baseline: reloading the 16 GB model from disk per (fold, lr) run, retain-set "
            "evaluation and sampled generations after every epoch (large); rtteval: the in-memory "
            "weight restore per run and the one 'before' V evaluation per fold (small); so the "
            "ratio understates the stage's speedup. V eval: ceil(158 / batch) batches at the "
            "full-batch time."
        )
        for side in ("baseline", "rtteval"):
            o = out[side]
            ev_txt = f" + V eval {o['v_eval_s'] / 3600:.2f} h" if o["v_eval_s"] is not None else ""
            log(
                f"sweep estimate {side}: {o['total_h']:.2f} h "
                f"(train {o['train_s'] / 3600:.2f} h{ev_txt})"
            )
        log(f"sweep estimate ratio baseline/rtteval: {out['ratio_baseline_over_rtteval']:.2f}")
        return out

    # -- main

    def run(self) -> None:
        args, rec = self.args, self.rec
        self.dtype = torch.float32 if args.smoke and args.dtype == "auto" else torch.bfloat16
        if args.dtype == "float32":
            self.dtype = torch.float32
        overrides = dict(SMOKE if args.smoke else LLAMA3_8B)
        if args.layers is not None:
            overrides["num_hidden_layers"] = args.layers
        self.vocab = overrides["vocab_size"]
        meta: dict[str, Any] = {
            "smoke": args.smoke,
            "device": torch.cuda.get_device_name() if self.cuda else "cpu",
            "torch": torch.__version__,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "config": overrides,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        try:
            import transformers

            meta["transformers"] = transformers.__version__
        except Exception:  # pragma: no cover
            pass
        rec.put("meta", None, meta)
        log(f"device {meta['device']}, torch {torch.__version__}, dtype {meta['dtype']}")

        rec.put("peak_matmul", None, self.guarded("matmul peak", self.measure_peak))

        t = time.perf_counter()
        torch.manual_seed(args.seed)
        self.model, config = build_model(overrides, self.device, self.dtype)
        self.sync()
        n_params = sum(p.numel() for p in self.model.parameters())
        n_embed = self.model.get_input_embeddings().weight.numel()
        self.n_head = self.model.get_output_embeddings().weight.numel()
        self.n_matmul = n_params - n_embed
        layers, hidden = overrides["num_hidden_layers"], overrides["hidden_size"]
        mean_len = (args.min_len + args.max_len) / 2
        rec.put(
            "flops",
            None,
            {
                "n_params": n_params,
                "n_embedding": n_embed,
                "n_matmul": self.n_matmul,
                "train": "6 * n_matmul * real tokens (attention score/value products excluded)",
                "forward": "2 * n_matmul * real tokens; last-position variant: "
                "2 * (n_matmul - head) * tokens + 2 * head * batch",
                "n_matmul_def": "all parameters minus the input embedding (untied head counted)",
                "attention_share_excluded": 12
                * layers
                * hidden
                * mean_len
                / (6 * self.n_matmul + 12 * layers * hidden * mean_len),
                "tokens": "real (non-padding); padded counts reported alongside",
            },
        )
        rec.data["meta"]["model_init_s"] = time.perf_counter() - t
        rec.data["meta"]["rope"] = getattr(config, "rope_parameters", None) or getattr(
            config, "rope_theta", None
        )
        rec.data["meta"]["weights_gib"] = (
            torch.cuda.memory_allocated() / 2**30 if self.cuda else None
        )
        rec.save()
        log(
            f"model: {n_params / 1e9:.3f} B parameters ({self.n_matmul / 1e9:.3f} B in matmuls), "
            f"{layers} layers, built in {rec.data['meta']['model_init_s']:.1f} s"
        )
        self.seqs = random_seqs(
            SWEEP["train_questions"], args.min_len, args.max_len, self.vocab, args.seed
        )

        def train_m(key: str, fn: Callable[[], dict], need_s: float = 0.0) -> None:
            r = self.guarded(key, fn, self.model, need_s)
            if r is not None:
                rec.put("train", key, r)

        def eval_m(bs: int, mode: str) -> None:
            r = self.guarded(f"eval bs{bs} {mode}", lambda: self.eval_bench(bs, mode), self.model)
            if r is not None:
                rec.put("eval", f"bs{bs}_{mode}", r)

        train_m("baseline_bs4", lambda: self.baseline_step_bench(4))
        train_m("rtteval_bs4", lambda: self.rtteval_step_bench(4))
        eval_m(4, "copy")
        eval_m(args.eval_batch, "letters")
        eval_m(args.eval_batch, "copy")
        eval_m(args.eval_batch, "forward")
        eval_m(args.eval_batch, "last")
        est = self.sweep_estimate()
        if est is not None:
            rec.put("sweep_estimate", None, est)
        train_m("rtteval_bs4_snapshot", lambda: self.rtteval_step_bench(4, snapshot=True))
        for bs in args.big_batches:
            train_m(f"rtteval_bs{bs}", lambda bs=bs: self.rtteval_step_bench(bs))
        for ckpt in (False, True):
            for mode in args.precisions:
                key = f"rtteval_bs4_{mode}" + ("_checkpointing" if ckpt else "")
                train_m(
                    key,
                    lambda m=mode, c=ckpt: self.rtteval_step_bench(4, precision=m, checkpointing=c),
                )
            if not ckpt:
                for rank, n in args.lora:
                    r = self.guarded(
                        f"LoRA r{rank} x{n}", lambda r=rank, n=n: self.lora_step_bench(r, n)
                    )
                    if r is not None:
                        rec.put("lora", f"r{rank}_x{n}", r)
        if args.compile:
            train_m(
                "rtteval_bs4_compiled",
                lambda: self.rtteval_step_bench(4, compiled=True),
                need_s=0 if args.smoke else 150,
            )

        for i in range(2, args.repeat + 1):  # run-to-run noise of the headline pair
            for key, fn in (
                ("baseline_bs4", lambda: self.baseline_step_bench(4)),
                ("rtteval_bs4", lambda: self.rtteval_step_bench(4)),
            ):
                train_m(f"{key}_repeat{i}", fn)
        tr, ev = rec.data.get("train", {}), rec.data.get("eval", {})
        if args.repeat > 1:
            reps = {
                key: [
                    tr[k]["tokens_per_s"]
                    for k in [key] + [f"{key}_repeat{i}" for i in range(2, args.repeat + 1)]
                    if k in tr
                ]
                for key in ("baseline_bs4", "rtteval_bs4")
            }
            if all(reps.values()):
                reps["speedup_median"] = statistics.median(reps["rtteval_bs4"]) / (
                    statistics.median(reps["baseline_bs4"])
                )
            rec.put("repeats_tokens_per_s", None, reps)
        speedup = None
        if "baseline_bs4" in tr and "rtteval_bs4" in tr:
            speedup = tr["rtteval_bs4"]["tokens_per_s"] / tr["baseline_bs4"]["tokens_per_s"]
        eval_fwd = ev.get(f"bs{args.eval_batch}_forward")
        mfu_eval = eval_fwd["mfu"] if eval_fwd else None
        rec.put("headline", None, {"speedup_step_bs4": speedup, "mfu_eval": mfu_eval})
        rec.data["meta"]["total_s"] = time.perf_counter() - T0
        rec.save()
        log(f"wrote {rec.path}")
        print(
            f"speedup_step_bs4: {speedup:.3f}" if speedup else "speedup_step_bs4: n/a", flush=True
        )
        print(f"mfu_eval: {mfu_eval:.3f}" if mfu_eval else "mfu_eval: n/a", flush=True)


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_rtt.json" if out else Path("gpu_rtt.json")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default $OUT/gpu_rtt.json or ./gpu_rtt.json)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny float32 model on CPU, 1+2 steps")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    ap.add_argument(
        "--eval-steps", type=int, default=None, help="timed eval batches (default 5; smoke 2)"
    )
    ap.add_argument("--eval-batch", type=int, default=None, help="default 64; smoke 8")
    ap.add_argument(
        "--big-batches", default=None, help="rtteval step at these batch sizes (default 16,32)"
    )
    ap.add_argument("--min-len", type=int, default=None, help="default 90; smoke 16")
    ap.add_argument("--max-len", type=int, default=None, help="default 128; smoke 32")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--peak-n", type=int, default=8192)
    ap.add_argument(
        "--compile", action="store_true", help="also time rtteval's step compiled (last)"
    )
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip measurements after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure the baseline and rtteval bs4 steps this many times in all (noise)",
    )
    ap.add_argument(
        "--precisions",
        default=",".join(PRECISIONS),
        help=f"rtteval step under each (default {','.join(PRECISIONS)}; '' for none)",
    )
    ap.add_argument(
        "--lora",
        default=None,
        help="LoRA-RTT step at RANKxADAPTERS,... (default 16x1,16x6,16x12,128x1,128x6,128x12; "
        "smoke 4x1,4x3; '' for none)",
    )
    args = ap.parse_args(argv)
    args.precisions = [p for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in args.precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"unknown precision {bad[0]!r}; use {', '.join(PRECISIONS)}")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 10)
    args.eval_steps = args.eval_steps if args.eval_steps is not None else (2 if args.smoke else 5)
    smoke = args.smoke
    args.eval_batch = args.eval_batch or (8 if smoke else 64)
    args.min_len = args.min_len or (16 if smoke else 90)
    args.max_len = args.max_len or (32 if smoke else 128)
    big = args.big_batches if args.big_batches is not None else ("8" if smoke else "16,32")
    args.big_batches = [int(x) for x in big.split(",") if x.strip()]
    lora = (
        args.lora
        if args.lora is not None
        else ("4x1,4x3" if smoke else "16x1,16x6,16x12,128x1,128x6,128x12")
    )
    try:
        args.lora = [
            [int(a), int(b)] for a, b in (x.split("x") for x in lora.split(",") if x.strip())
        ]
    except ValueError:
        ap.error(f"--lora wants RANKxADAPTERS,... (e.g. 16x6), not {lora!r}")
    args.out = args.out or default_out()
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    global T0
    T0 = time.perf_counter()
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --smoke for the tiny CPU check")
    rec = Recorder(args.out)
    Bench(args, rec).run()
    return rec.data


if __name__ == "__main__":
    main()
