"""The batched learning-rate grid: copies of one model, each trained at its own lr, in one pass."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from rtteval.errors import ConfigError
from rtteval.training.precision import PRECISIONS


class _Grouped(torch.nn.Module):
    """A layer of the batched copy: the same layer of all G members, applied at once.

    Activations in the batched copy are member-major (rows ``g*B`` to ``(g+1)*B - 1`` of the
    batch are member g's), so layers without weights (attention, rotary embeddings,
    activations, the causal mask) run unchanged; only layers with weights are grouped.
    ``weights`` maps the layer's parameter names to stacked ``[G, ...]`` tensors owned by the
    :class:`LrGrid` (not registered here).
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


def grid_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot be an :class:`LrGrid` member, or None when it can.

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


class LrGrid(torch.nn.Module):
    """Copies of one model, member g to be trained at ``lrs[g]``, run as one batched model.

    Why: RTT fine-tunes one model on the same batches at several learning rates.  A step of a
    small model is hundreds of small operations; one pass over the G members' stacked weights
    runs each of them once on G-times larger tensors (``bmm`` instead of ``mm``), which costs
    less than G passes (tiny-1m, batch 4, G=3: 1.4x less; docs/performance.md).  Members never
    mix: every operation of the batched pass acts on one member's rows or one member's
    matrix, so member g's loss, gradient and update are those of training it alone, up to
    float rounding (tests/training/test_grid.py compares the two).

    * ``forward`` takes one model's inputs and returns logits ``[G, batch, time, vocab]``.
    * ``members[g]`` is a plain copy of the model whose parameters are views of member g's
      weights: evaluation runs on it, and it always shows the member's current state.
    * :meth:`member_tensors` gives each member's weights as one flat tensor whose ``.grad``
      the backward pass fills, so :func:`train` optimizes, clips and freezes per member with
      one tensor operation each.
    """

    def __init__(self, model: torch.nn.Module, lrs: Sequence[float]):
        super().__init__()
        reason = grid_unsupported(model)
        if reason:
            raise ConfigError(f"model cannot be trained as an lr grid: {reason}")
        if not lrs:
            raise ConfigError("an lr grid needs at least one learning rate")
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

    def param_groups(self, precision: str) -> list[list[torch.Tensor]]:
        """One optimizer group per member (its flat tensor), once the dtype fits ``precision``."""
        if self.dtype != PRECISIONS[precision][0]:
            raise ConfigError(
                f"the lr grid's weights are {self.dtype}, precision {precision} needs "
                f"{PRECISIONS[precision][0]}: build it from a model cast by cast_for_precision"
            )
        return [[t] for t in self.member_tensors()]

    def update(
        self,
        opt: torch.optim.Optimizer,
        loss: torch.Tensor,
        groups: list[list[torch.Tensor]],
        live: list[int],
        grad_clip: float | None,
    ) -> None:
        """One optimizer step of the live members, each clipped by its own gradient norm.

        A member not in ``live`` is frozen: its gradient is dropped, so the optimizer skips it.
        """
        opt.zero_grad(set_to_none=False)  # the members' grads are fixed views of one buffer
        self.backward(loss[live].sum())  # members are independent: the sum's gradient is each's own
        for i, group in enumerate(groups):
            if i not in live:
                for p in group:
                    p.grad = None
            elif grad_clip:
                torch.nn.utils.clip_grad_norm_(group, grad_clip)
        opt.step()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, the gradients landing in the members' flat ``.grad`` buffers.

        Those are strided views of one buffer by design; torch flags such a layout (once).
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*gradient layout contract")
            loss.backward()

    def train(self, mode: bool = True) -> LrGrid:
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
