"""The one training loop.

Pretraining, every unlearning method and the RTT attack all call
:func:`train`.  What differs between them is data and loss, so those are
arguments: ``batches(epoch)`` returns the epoch's batches (any nesting of
dicts of tensors) and ``loss_fn(model, batch)`` returns a scalar loss plus
numbers to log.  Everything else — optimizer, schedule, clipping, autocast,
evaluation, early stopping, divergence handling, progress — lives here once.
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, overload

import torch
from transformers import PreTrainedTokenizerBase

from rtteval.config.study import Precision
from rtteval.errors import ConfigError

Batch = dict[str, Any]
LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, dict[str, float]]"]


# --------------------------------------------------------------------------- optimizers


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023), the optimizer of the paper's code.

    The update is ``sign(beta1*m + (1-beta1)*g)``; it is applied to all
    parameters of a group with ``torch._foreach`` ops rather than one Python
    step per parameter.  On the CPU the update lives in a buffer kept in the
    state: a fresh allocation of that size page-faults on every step (measured:
    the allocating multiply cost 5x the in-place ones).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        compensate: bool = False,
    ):
        if lr <= 0:
            raise ConfigError(f"Lion learning rate must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.compensate = compensate

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self.compensate:
                self._compensated_step(group, params)
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            avgs = [self.state[p]["exp_avg"] for p in params]
            b1, b2 = group["betas"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            if params[0].device.type == "cpu":
                for p in params:
                    if "update" not in self.state[p]:
                        self.state[p]["update"] = torch.empty_like(p)
                update = [self.state[p]["update"] for p in params]
                for u, m in zip(update, avgs, strict=True):
                    torch.mul(m, b1, out=u)
            else:
                update = torch._foreach_mul(avgs, b1)
            torch._foreach_add_(update, grads, alpha=1 - b1)
            torch._foreach_sign_(update)
            torch._foreach_add_(params, update, alpha=-group["lr"])
            torch._foreach_mul_(avgs, b2)
            torch._foreach_add_(avgs, grads, alpha=1 - b2)
        return loss

    def _compensated_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The same update, kept in fp32 (momentum and a Kahan residual) for low-precision weights.

        One parameter at a time, so the fp32 temporaries are one tensor's, not the model's.
        """
        b1, b2, lr, wd = *group["betas"], group["lr"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["comp"] = torch.zeros_like(p, dtype=torch.float32)
            m, g = state["exp_avg"], p.grad.float()
            update = torch.lerp(m, g, 1 - b1).sign_()
            m.lerp_(g, 1 - b2)
            del g
            _kahan_add_(p, state["comp"], update, lr, wd)


def _kahan_add_(
    p: torch.Tensor, comp: torch.Tensor, update: torch.Tensor, lr: float, wd: float
) -> None:
    """``p -= lr * (update + wd * p)`` without losing what rounding ``p`` drops.

    ``comp`` (fp32) holds the part of the fp32 result that ``p``'s dtype cannot
    represent, so ``p + comp`` is the weight fp32 training would have.  A
    bf16 residual (torch-optimi's Kahan summation) stops absorbing an lr
    below 1/256 of itself, so it too loses small updates over many steps
    (docs/performance.md).  ``update`` is consumed as scratch space.
    """
    exact = p.float().add_(comp)
    if wd:
        exact.mul_(1 - lr * wd)
    exact.add_(update, alpha=-lr)
    p.copy_(exact)
    comp.copy_(exact.sub_(p))


def carried_weights(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The fp32 weights an optimizer carries: each parameter plus its Kahan residual, if any.

    A compensated run's progress below the weights' rounding step lives in
    the residual until it adds up to a step; this is where to see it.
    """
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            comp = opt.state.get(p, {}).get("comp")
            out.append(p.detach().float() + (comp if comp is not None else 0.0))
    return out


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) for low-precision weights.

    Moments and the update are fp32 and applied with :func:`_kahan_add_`, so
    bf16 weights receive every update, however small next to their rounding step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr <= 0:
            raise ConfigError(f"AdamW learning rate must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    for k in ("exp_avg", "exp_avg_sq", "comp"):
                        state[k] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad.float()
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = v.div(1 - b2**t).sqrt_().add_(group["eps"])
                torch.div(m, update, out=update).div_(1 - b1**t)
                del g
                _kahan_add_(p, state["comp"], update, group["lr"], group["weight_decay"])
        return loss


# --------------------------------------------------------------------------- precision

#: Training precisions (docs/performance.md).  ``fp32``: fp32 weights (bf16
#: autocast on a GPU).  ``bf16``: bf16 weights whose updates are kept in fp32
#: (optimizer state and a Kahan residual), so none is lost to rounding.
#: ``bf16-pure`` / ``fp16``: the weights' dtype throughout, updates smaller
#: than half a rounding step vanish (``fp16`` is the paper's released RTT).
PRECISIONS: dict[str, tuple[torch.dtype, bool]] = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, True),
    "bf16-pure": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` is ``bf16`` on a GPU (keeps every update, half the weight memory) and ``fp32``
    elsewhere, so CPU numbers are those of fp32 training."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def check_precision(precision: str) -> None:
    """Refuse an unknown precision name before any work is done."""
    if precision != "auto" and precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; use auto, {', '.join(PRECISIONS)}", field="precision"
        )


def cast_for_precision(model: torch.nn.Module, precision: str) -> str:
    """Give ``model``'s floating-point parameters the precision's dtype, in place.

    Parameters only: buffers such as rotary frequencies stay as the model
    built them.  Returns the resolved precision.
    """
    params = list(model.parameters())
    mode = resolve_precision(precision, params[0].device)
    cast_parameters(model, [PRECISIONS[mode][0]] * len(params))
    return mode


def cast_parameters(model: torch.nn.Module, dtypes: Sequence[torch.dtype]) -> None:
    """Give each floating-point parameter its dtype from ``dtypes`` (in parameter order)."""
    for p, dtype in zip(model.parameters(), dtypes, strict=True):
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def rounding_step(magnitude: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s numbers at ``magnitude`` (one ulp)."""
    if magnitude <= 0:
        return float(torch.finfo(dtype).tiny)
    return float(torch.finfo(dtype).eps) * 2.0 ** math.floor(math.log2(magnitude))


def median_magnitude(tensors: Sequence[torch.Tensor], sample: int = 1 << 20) -> float:
    """Median |w| over ``tensors``, from an evenly strided sample of at most ``sample`` values."""
    total = sum(t.numel() for t in tensors)
    stride = max(1, total // sample)
    parts = [t.detach().reshape(-1)[::stride].float().abs() for t in tensors]
    return float(torch.cat(parts).median()) if parts else 0.0


def lost_update_warnings(
    tensors: Sequence[torch.Tensor], lrs: Sequence[float], precision: str
) -> list[str]:
    """A warning per lr below half the rounding step of weights at their median magnitude.

    Such an update rounds away on a typical weight (an update of about lr is
    what Lion makes exactly and Adam roughly), so training silently does
    less than its lr says.  The compensated ``bf16`` precision never warns.
    """
    dtype, compensated = PRECISIONS[precision]
    if compensated or not tensors:
        return []
    mag = median_magnitude(tensors)
    half = rounding_step(mag, dtype) / 2
    return [
        f"precision {precision}: lr {lr:g} is below half the rounding step ({half:.3g}) of "
        f"{str(dtype).removeprefix('torch.')} weights at their median magnitude {mag:.3g}, "
        "so most updates are lost; use precision bf16 or fp32"
        for lr in lrs
        if lr < half
    ]


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Hyperparameters of one run; plain data so it is stored with results."""

    lr: float = 1e-3
    epochs: int = 1
    max_steps: int | None = None
    optimizer: Literal["adamw", "lion"] = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    #: AdamW's ε.  Tiny-model unlearning raises it (1e-4, docs/methods.md):
    #: a tied embedding's rows of tokens absent from a batch get only the
    #: softmax's tail gradient, which Adam's 1/√v would scale up to full steps.
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every_steps: int | None = None
    eval_every_epochs: int | None = 1
    eval_at_start: bool = False
    max_loss: float | None = None
    #: Only for ``fp32`` weights (``precision: fp32``); other precisions compute in their dtype.
    autocast: Literal["auto", "off", "bf16"] = "auto"
    #: Weight dtype and update rule (:data:`PRECISIONS`); ``auto``: bf16 on a GPU, fp32 on CPU.
    precision: Precision = "auto"
    #: Recompute activations in the backward pass (Hugging Face models): less memory, ~1/3 slower.
    gradient_checkpointing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What happened: ``status`` is ``completed``, ``stopped_early`` or ``diverged``."""

    status: str
    steps: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    wall_time: float = 0.0
    tokens: int = 0
    message: str = ""
    #: The resolved precision (``fp32``, ``bf16``, ...) and its lost-update warnings.
    precision: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_time if self.wall_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "steps": self.steps,
            "epochs_run": self.epochs_run,
            "history": self.history,
            "final_loss": self.losses[-1] if self.losses else None,
            "wall_time": self.wall_time,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
            "message": self.message,
            "precision": self.precision,
            "warnings": self.warnings,
        }


def make_optimizer(
    params: list[Any], cfg: TrainConfig, *, compensate: bool = False
) -> torch.optim.Optimizer:
    """``params``: tensors, or param-group dicts (an Ensemble: one group per member).

    ``compensate``: keep every update of low-precision weights (precision ``bf16``).
    """
    if cfg.optimizer == "adamw":
        cls = KahanAdamW if compensate else torch.optim.AdamW
        return cls(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "lion":
        return Lion(
            params,
            lr=cfg.lr,
            betas=(0.9, 0.99),
            weight_decay=cfg.weight_decay,
            compensate=compensate,
        )
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use adamw or lion")


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, then constant / cosine / linear decay to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - progress)
    raise ConfigError(f"unknown schedule {cfg.schedule!r}; use constant, cosine or linear")


# --------------------------------------------------------------------------- batching


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    add_eos: bool = True,
    sources: Sequence[str | None] | None = None,
) -> list[list[int]]:
    """Token ids with BOS (from the tokenizer) and EOS appended.

    A text longer than ``max_length`` (default: the model's context, see
    :func:`rtteval.scoring.check_context`) is refused, never truncated;
    ``sources`` (``path:line`` per text) let the error name the longest one's line.
    """
    from rtteval.scoring import check_context

    out = []
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=True, verbose=False)
        if add_eos and tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        out.append(ids)
    check_context(
        tokenizer, [len(s) for s in out], sources, what="a training text", texts=texts,
        limit=max_length,
    )  # fmt: skip
    return out


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, loss_masks: Sequence[Sequence[int]] | None = None
) -> Batch:
    """Right-padded batch; ``labels`` are -100 on padding and outside each loss mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.tensor(s, dtype=torch.long)
        ids[i, : len(s)] = t
        mask[i, : len(s)] = 1
        if loss_masks is None:
            labels[i, : len(s)] = t
        else:
            m = torch.tensor(loss_masks[i], dtype=torch.bool)
            labels[i, : len(s)] = torch.where(m, t, torch.full_like(t, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_batches(
    seqs: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    bucket: bool = True,
    loss_masks: Sequence[Sequence[int]] | None = None,
) -> list[Batch]:
    """Shuffle, then group sequences of similar length so padding wastes little compute.

    Bucketing sorts within windows of 50 batches, then shuffles the batch
    order, so an epoch is still a random pass over the data.
    """
    order = list(range(len(seqs)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * 50
        order = [
            i
            for w in range(0, len(order), window)
            for i in sorted(order[w : w + window], key=lambda j: len(seqs[j]))
        ]
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and bucket:
        rng.shuffle(groups)
    return [
        pad_batch(
            [seqs[i] for i in g], pad_id, None if loss_masks is None else [loss_masks[i] for i in g]
        )
        for g in groups
    ]


def count_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        if "attention_mask" in batch and isinstance(batch["attention_mask"], torch.Tensor):
            return int(batch["attention_mask"].sum())
        return sum(count_tokens(v) for v in batch.values())
    return 0


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# --------------------------------------------------------------------------- losses


def batch_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of a padded training batch (every loss goes through here)."""
    from rtteval.scoring import forward_logits

    return forward_logits(model, batch["input_ids"], batch["attention_mask"])


def nll_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL over label positions, with mask-derived position ids.

    For an :class:`Ensemble` (logits ``[G, B, T, V]``) one mean per member, ``[G]``.
    """
    logits = batch_logits(model, batch)[..., :-1, :]
    labels = batch["labels"][:, 1:]
    if logits.dim() == 3:
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.repeat(len(logits), 1).reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    return nll.view(len(logits), -1).sum(1) / (labels != -100).sum()


def lm_loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain language-modelling loss (pretraining, RTT); per member for an :class:`Ensemble`."""
    loss = nll_loss(model, batch)
    return loss, {"nll": float(loss.detach().mean())}


# --------------------------------------------------------------------------- ensembles


class _Grouped(torch.nn.Module):
    """A layer of the batched copy: the same layer of all G members, applied at once.

    Activations in the batched copy are member-major (rows ``g*B`` to ``(g+1)*B - 1`` of the
    batch are member g's), so layers without weights (attention, rotary embeddings,
    activations, the causal mask) run unchanged; only layers with weights are grouped.
    ``weights`` maps the layer's parameter names to stacked ``[G, ...]`` tensors owned by the
    :class:`Ensemble` (not registered here).
    """

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.__dict__["weights"] = weights
        self.size = next(iter(weights.values())).shape[0]


class _GroupedLinear(_Grouped):
    """``nn.Linear`` as one ``bmm``; a weight only linears use is stored ``[G, in, out]``.

    That layout makes the weight gradient of the bmm land in the stored layout with no copy.
    """

    def __init__(self, weights: dict[str, torch.Tensor], transposed: bool):
        super().__init__(weights)
        self.transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights["weight"]
        y = torch.bmm(x.reshape(self.size, -1, x.shape[-1]), w if self.transposed else w.mT)
        if "bias" in self.weights:
            y = y + self.weights["bias"].unsqueeze(1)
        return y.view(*x.shape[:-1], y.shape[-1])


class _GroupedEmbedding(_Grouped):
    """``nn.Embedding`` over the G tables side by side (member g's ids offset by g * vocab)."""

    def __init__(self, weights: dict[str, torch.Tensor], padding_idx: int | None):
        super().__init__(weights)
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weights["weight"]
        vocab = w.shape[1]
        member = torch.arange(self.size, device=ids.device).repeat_interleave(len(ids) // self.size)
        out = torch.nn.functional.embedding(
            ids + (member * vocab).view(-1, *[1] * (ids.dim() - 1)), w.reshape(-1, w.shape[-1])
        )
        if self.padding_idx is not None:  # as nn.Embedding: no gradient into the padding row
            out = torch.where((ids == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out


class _GroupedNorm(_Grouped):
    """An RMSNorm-style layer (weights scale the last dimension), run on ``[G, B, ...]``."""

    def __init__(self, weights: dict[str, torch.Tensor], source: torch.nn.Module):
        super().__init__(weights)
        self.inner = copy.deepcopy(source)
        for name in weights:
            delattr(self.inner, name)  # set per call to the member-broadcast weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.reshape(self.size, -1, *x.shape[1:])
        for name, w in self.weights.items():
            setattr(self.inner, name, w.view(self.size, *[1] * (xs.dim() - 2), w.shape[-1]))
        return self.inner(xs).reshape(x.shape)


def ensemble_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot be an :class:`Ensemble` member, or None when it can.

    Every layer with weights must have a grouped version: ``nn.Linear``, a plain
    ``nn.Embedding`` or an RMSNorm (the Llama family); weights on one device, one dtype.
    """
    params = list(model.parameters())
    if len({(p.device, p.dtype) for p in params}) != 1:
        return "parameters on several devices or of several dtypes"
    for name, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        if not own or isinstance(mod, torch.nn.Linear):
            continue
        if isinstance(mod, torch.nn.Embedding):
            if mod.max_norm is None and not mod.sparse and not mod.scale_grad_by_freq:
                continue
        elif type(mod).__name__.endswith("RMSNorm") and all(p.dim() == 1 for p in own):
            continue
        return f"layer {name or '<root>'} ({type(mod).__name__}) has no grouped version"
    return None


class Ensemble(torch.nn.Module):
    """Copies of one model, member g to be trained at ``lrs[g]``, run as one batched model.

    Why: RTT fine-tunes one model on the same batches at several learning rates.  A step of a
    small model is hundreds of small operations; one pass over the G members' stacked weights
    runs each of them once on G-times larger tensors (``bmm`` instead of ``mm``), which costs
    less than G passes (tiny-1m, batch 4, G=3: 1.4x less; docs/performance.md).  Members never
    mix: every operation of the batched pass acts on one member's rows or one member's
    matrix, so member g's loss, gradient and update are those of training it alone, up to
    float rounding (tests/training/test_loop.py compares the two).

    * ``forward`` takes one model's inputs and returns logits ``[G, batch, time, vocab]``.
    * ``members[g]`` is a plain copy of the model whose parameters are views of member g's
      weights: evaluation runs on it, and it always shows the member's current state.
    * :meth:`member_tensors` gives each member's weights as one flat tensor whose ``.grad``
      the backward pass fills, so :func:`train` optimizes, clips and freezes per member with
      one tensor operation each.
    """

    def __init__(self, model: torch.nn.Module, lrs: Sequence[float]):
        super().__init__()
        reason = ensemble_unsupported(model)
        if reason:
            raise ConfigError(f"model cannot be trained as an ensemble: {reason}")
        if not lrs:
            raise ConfigError("an ensemble needs at least one learning rate")
        self.lrs = [float(lr) for lr in lrs]
        g = len(self.lrs)
        batched = copy.deepcopy(model)
        self.members = torch.nn.ModuleList(copy.deepcopy(model) for _ in range(g))
        users: dict[int, list[torch.nn.Module]] = {}
        for mod in batched.modules():
            for p in mod.parameters(recurse=False):
                users.setdefault(id(p), []).append(mod)
        named = list(batched.named_parameters())
        transposed = {
            id(p): p.dim() == 2 and all(isinstance(m, torch.nn.Linear) for m in users[id(p)])
            for _, p in named
        }
        p0 = named[0][1]
        n = sum(p.numel() for _, p in named)
        self._flat = torch.zeros(g, n, device=p0.device, dtype=p0.dtype)
        self._flat_grad = torch.zeros_like(self._flat)
        # name -> (stacked [G, ...] leaf for the batched pass, whether stored transposed)
        self._stacked: dict[str, tuple[torch.Tensor, bool]] = {}
        by_id: dict[int, torch.Tensor] = {}
        start = 0
        for name, p in named:
            t = transposed[id(p)]
            shape = tuple(p.shape[::-1]) if t else tuple(p.shape)
            span = slice(start, start + p.numel())
            start += p.numel()
            stacked = self._flat[:, span].view(g, *shape).requires_grad_(True)
            stacked.grad = self._flat_grad[:, span].view(g, *shape)
            self._stacked[name] = (stacked, t)
            by_id[id(p)] = stacked
            for k, member in enumerate(self.members):
                view = self._flat[k, span].view(shape)
                member.get_parameter(name).data = view.t() if t else view
        for name, mod in list(batched.named_modules()):
            own = dict(mod.named_parameters(recurse=False))
            if not own:
                continue
            weights = {k: by_id[id(p)] for k, p in own.items()}
            if isinstance(mod, torch.nn.Linear):
                new: torch.nn.Module = _GroupedLinear(weights, transposed[id(mod.weight)])
            elif isinstance(mod, torch.nn.Embedding):
                new = _GroupedEmbedding(weights, mod.padding_idx)
            else:
                new = _GroupedNorm(weights, mod)
            parent, _, attr = name.rpartition(".")
            setattr(batched.get_submodule(parent), attr, new)
        self.__dict__["batched"] = batched  # not a submodule: its weights are the members'
        self.reset_(model)

    @property
    def size(self) -> int:
        return len(self.lrs)

    @property
    def dtype(self) -> torch.dtype:
        return self._flat.dtype

    @torch.no_grad()
    def reset_(self, model: torch.nn.Module) -> None:
        """Make every member a copy of ``model``'s current weights (RTT: before each fold)."""
        for name, p in model.named_parameters():
            stacked, t = self._stacked[name]
            stacked.copy_((p.t() if t else p).expand_as(stacked))
        self._flat_grad.zero_()

    def member_tensors(self) -> list[torch.Tensor]:
        """Member g's weights as one flat tensor, its ``.grad`` filled by ``backward``."""
        out = []
        for k in range(self.size):
            flat = self._flat[k]
            flat.grad = self._flat_grad[k]
            out.append(flat)
        return out

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, the gradients landing in the members' flat ``.grad`` buffers.

        Those are strided views of one buffer by design; torch flags such a layout (once).
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*gradient layout contract")
            loss.backward()

    def train(self, mode: bool = True) -> Ensemble:
        self.batched.train(mode)
        return super().train(mode)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """One model's inputs in, the model's output with logits ``[G, batch, time, vocab]``."""
        rep = {
            k: v.repeat(self.size, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) else v
            for k, v in {"input_ids": input_ids, **kwargs}.items()
        }
        out = self.batched(**rep)
        out.logits = out.logits.view(self.size, -1, *out.logits.shape[1:])
        return out


# --------------------------------------------------------------------------- the loop


def _autocast(cfg: TrainConfig, device: torch.device, precision: str):
    use = precision == "fp32" and (
        cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    )
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)


class LostUpdateWarning(UserWarning):
    """An lr too small for the weights' dtype: most updates round away (see :func:`train`)."""


def _gradient_checkpointing(model: torch.nn.Module, cfg: TrainConfig) -> bool:
    """Turn on Hugging Face gradient checkpointing if ``cfg`` asks and it is off; True if it did."""
    from rtteval.models.loading import is_checkpointing, set_checkpointing

    if not cfg.gradient_checkpointing or is_checkpointing(model):
        return False
    set_checkpointing(model, True)
    return True


@overload
def train(
    model: Ensemble,
    batches: Callable[[int], Sequence[Batch]],
    loss_fn: LossFn,
    cfg: TrainConfig,
    **kwargs: Any,
) -> list[TrainResult]: ...


@overload
def train(
    model: torch.nn.Module,
    batches: Callable[[int], Sequence[Batch]],
    loss_fn: LossFn,
    cfg: TrainConfig,
    **kwargs: Any,
) -> TrainResult: ...


def train(
    model: torch.nn.Module,
    batches: Callable[[int], Sequence[Batch]],
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    stop: Callable[[dict[str, Any]], bool] | None = None,
    trainable: Callable[[str], bool] | None = None,
    progress: str | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    on_finish: Callable[[torch.optim.Optimizer], None] | None = None,
) -> TrainResult | list[TrainResult]:
    """Train ``model`` in place.

    ``evaluate(model)`` runs every ``eval_every_steps`` steps and/or at the
    end of every ``eval_every_epochs`` epochs; its dict (plus step/epoch) is
    appended to the history and passed to ``stop``, which ends training
    early when it returns True.  A non-finite loss, or one above
    ``max_loss``, ends the run with status ``diverged`` instead of raising,
    so one bad grid point never crashes a sweep.  ``trainable(name)`` picks
    the parameters to update (RMU trains a few layers only).

    An :class:`Ensemble` trains its members side by side, member g at
    ``model.lrs[g]`` times the schedule (``cfg.lr`` is unused): ``loss_fn``
    returns one loss per member, and everything above — clipping by the
    member's own gradient norm, divergence, ``evaluate`` (called with
    ``model.members[g]``), ``stop`` — is per member.  A diverged or stopped
    member is frozen while the others go on.  One :class:`TrainResult` per
    member comes back; their ``wall_time`` is the shared run's.

    ``cfg.precision`` casts a plain model's parameters to its dtype first (an
    Ensemble must be built from a cast model).  An lr too small for that
    dtype (:func:`lost_update_warnings`) warns and is recorded in the result.
    ``on_finish(optimizer)`` runs when training ends (see :func:`carried_weights`).
    """
    ens = model if isinstance(model, Ensemble) else None
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    if ens is not None:
        if trainable is not None:
            raise ConfigError("an Ensemble trains all parameters; trainable is not supported")
        precision = resolve_precision(cfg.precision, device)
        if ens.dtype != PRECISIONS[precision][0]:
            raise ConfigError(
                f"the ensemble's weights are {ens.dtype}, precision {precision} needs "
                f"{PRECISIONS[precision][0]}: build it from a model cast by cast_for_precision"
            )
        groups, lrs, members = [[t] for t in ens.member_tensors()], ens.lrs, list(ens.members)
    else:
        precision = cast_for_precision(model, cfg.precision)
        params = []
        for n, p in model.named_parameters():
            keep = trainable(n) if trainable is not None else True
            p.requires_grad_(keep)
            if keep:
                params.append(p)
        if not params:
            raise ConfigError("no trainable parameters selected")
        groups, lrs, members = [params], [cfg.lr], [model]
    opt = make_optimizer([{"params": g} for g in groups], cfg, compensate=PRECISIONS[precision][1])
    lost = [lost_update_warnings(g, [lr], precision) for g, lr in zip(groups, lrs, strict=True)]
    for msg in {m for ms in lost for m in ms}:
        warnings.warn(msg, LostUpdateWarning, stacklevel=2)
    checkpointing = _gradient_checkpointing(ens.batched if ens else model, cfg)
    first = batches(0)
    steps_per_epoch = len(first)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    total = (
        min(total, cfg.epochs * steps_per_epoch)
        if cfg.max_steps is not None and cfg.epochs
        else total
    )
    results = [
        TrainResult(status="completed", steps=0, epochs_run=0, precision=precision, warnings=w)
        for w in lost
    ]
    live = list(range(len(groups)))  # members still training
    step = 0
    t0 = time.perf_counter()

    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=True,
            console=Console(stderr=True),  # stdout is for results (JSON)
        )
        bar.start()
        task = bar.add_task(progress, total=total, info="")

    def run_eval(epoch: float) -> None:
        """Evaluate every live member; those ``stop`` says are done leave ``live``."""
        if evaluate is None:
            return
        for i in list(live):
            row = {"step": results[i].steps, "epoch": epoch, **evaluate(members[i])}
            model.train()
            results[i].history.append(row)
            if on_eval is not None:
                on_eval(row)
            if bar is not None:
                shown = {k: v for k, v in row.items() if isinstance(v, float)}
                info = " ".join(f"{k}={v:.3f}" for k, v in list(shown.items())[:3])
                bar.update(task, info=info)
            if stop is not None and stop(row):
                results[i].status = "stopped_early"
                live.remove(i)

    try:
        model.train()
        if cfg.eval_at_start:
            run_eval(0)
        epoch = 0
        while live and epoch < max(cfg.epochs, 1) and step < total:
            for i in live:
                results[i].epochs_run = epoch + 1
            for batch in first if epoch == 0 else batches(epoch):
                for group, lr in zip(opt.param_groups, lrs, strict=True):
                    group["lr"] = lr * lr_factor(step, total, cfg)
                batch = to_device(batch, device)
                with _autocast(cfg, device, precision):
                    loss, _ = loss_fn(model, batch)
                values = loss.detach().reshape(-1).tolist()
                for i in list(live):
                    if not math.isfinite(values[i]) or (
                        cfg.max_loss is not None and values[i] > cfg.max_loss
                    ):
                        results[i].status = "diverged"
                        results[i].message = f"loss {values[i]} at step {results[i].steps}"
                        live.remove(i)
                if not live:
                    break
                opt.zero_grad(set_to_none=ens is None)  # an ensemble's grads are fixed views
                if ens is None:
                    loss.backward()
                else:  # members are independent: the sum's gradient is each member's own
                    ens.backward(loss[live].sum())
                for i, group in enumerate(groups):
                    if i not in live:
                        for p in group:
                            p.grad = None  # frozen: the optimizer skips it
                    elif cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip)
                opt.step()
                step += 1
                tokens = count_tokens(batch)
                for i in live:
                    results[i].steps += 1
                    results[i].losses.append(values[i])
                    results[i].tokens += tokens
                if bar is not None:
                    bar.update(task, advance=1)
                if cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
                    run_eval(epoch + (step % steps_per_epoch) / steps_per_epoch)
                if not live or step >= total:
                    break
            epoch += 1
            if live and cfg.eval_every_epochs and epoch % cfg.eval_every_epochs == 0:
                run_eval(epoch)
        if on_finish is not None:
            on_finish(opt)
    finally:
        if checkpointing:
            from rtteval.models.loading import set_checkpointing

            set_checkpointing(ens.batched if ens else model, False)
        for p in model.parameters():
            p.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
        for r in results:
            r.wall_time = time.perf_counter() - t0
        if bar is not None:
            bar.stop()
        model.eval()
    return results if ens is not None else results[0]
