"""What an unlearning method is, and the forward-pass helpers they share.

A method is a small class: its name, which corpus it trains on, default
hyperparameters per model scale, a default sweep grid, and :meth:`Method.build`,
which returns ``(loss_fn, trainable)`` for :func:`rtteval.training.loop.train`.  The
unlearning loop (:mod:`rtteval.stages.unlearn`) hands every ``loss_fn`` a batch
``{"forget": ..., "retain": ...}`` of padded token batches (see
:func:`rtteval.training.batching.pad_batch`), so a method never sees data loading,
optimizers or evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, TypeAdapter, ValidationError
from transformers import PreTrainedTokenizerBase

from rtteval.config.study import Precision
from rtteval.data import Dataset
from rtteval.errors import ConfigError
from rtteval.training.batching import Batch
from rtteval.training.losses import LossFn, batch_logits, nll_loss

Trainable = Callable[[str], bool] | None

#: Model scales with their own defaults.  ``tiny`` is the embedded world's
#: from-scratch Llamas (<= ~10M parameters, tuned here on 2 CPU cores);
#: ``paper`` is Llama-3-8B-class models (starting points from the papers,
#: not re-tuned here: sweep them).
SCALES = ("tiny", "paper")

#: Training defaults shared by every method at each scale.
#:
#: Tiny models train only the token embeddings (tied to the LM head) with
#: AdamW at ε = 1e-4, until forget accuracy reaches 0.35, at most 600 steps.
#: Measured on the annealed tiny-1m (docs/methods.md, "Why retain accuracy
#: fell, and what fixed it"): training every weight with Adam's default ε
#: cost 15-60 points of held-out retain accuracy for every method but FWF.
#: The world's subjects have tokens of their own, so an update confined to
#: the embedding table lands mostly on the forget subjects' rows; and a large
#: ε stops Adam from turning the softmax's tiny tail gradient on every other
#: row (the held-out subjects' among them) into full-size steps.  With both,
#: all six methods keep held-out retain within 5 points on the default model
#: (on two other seeds' models GD, RMU and SimNPO sometimes do not; RIA and
#: FWF override ε to 1e-3).  The embedding table localizes facts only
#: because the world's subjects are whole tokens, hence a tiny-scale default
#: only.  Lion's sign updates overshoot at these sizes.  Paper scale follows
#: the paper: Lion, every weight, a few epochs.
TINY_TRAIN: dict = dict(
    optimizer="adamw",
    adam_eps=1e-4,
    adam_betas=(0.9, 0.95),
    train_only=["embed_tokens"],
    epochs=100,
    max_steps=600,
    batch_size=32,
    warmup_steps=0,
    grad_clip=1.0,
    target_forget_acc=0.35,
)
#: The paper's unlearning loop (unlearn_corpus.py): Lion, batch 4, 5 epochs,
#: linear warmup over 24 steps, no clipping, no early stopping, every weight.
#: docs/paper-fidelity.md lists each value with its line in the released code;
#: tests/test_paper_fidelity.py holds this table to it.
PAPER_TRAIN: dict = dict(
    optimizer="lion",
    epochs=5,
    max_steps=None,
    batch_size=4,
    warmup_steps=24,
    grad_clip=None,
    target_forget_acc=None,
    train_only=[],
)
#: AdamW as WMDP's RMU runs it (torch's betas, no clipping); RMU, NPO and SimNPO at paper scale.
PAPER_ADAMW: dict = dict(optimizer="adamw", adam_betas=(0.9, 0.999), adam_eps=1e-6, grad_clip=None)
TINY_MAX_PARAMS = 100_000_000


def num(kind: type, **bounds: float) -> Any:
    """A strict, finite number type with bounds: ``true`` is not 1 and 1e23 is not an int."""
    extra = {"allow_inf_nan": False} if kind is float else {}
    return Annotated[kind, Field(strict=True, **extra, **bounds)]


#: Declared types of the :class:`rtteval.stages.unlearn.UnlearnConfig` fields that a
#: study's ``grid``/``fixed`` (or ``unlearn --grid``) may set; a method's own
#: hyperparameters are declared in its ``hparam_types``.  A negative
#: ``target_forget_acc`` means "no early stopping" (UnlearnConfig says why).
TRAIN_PARAM_TYPES: dict[str, Any] = {
    "lr": num(float, gt=0),
    "optimizer": Literal["adamw", "lion"],
    "adam_eps": num(float, gt=0),
    "adam_betas": tuple[num(float, ge=0, lt=1), num(float, ge=0, lt=1)] | None,
    "epochs": num(int, ge=1),
    "max_steps": num(int, ge=1) | None,
    "batch_size": num(int, ge=1),
    "warmup_steps": num(int, ge=0),
    "schedule": Literal["constant", "cosine", "linear"],
    "grad_clip": num(float, gt=0) | None,
    "weight_decay": num(float, ge=0),
    "frozen": list[num(int, ge=0) | str] | None,
    "train_only": list[str] | None,
    "eval_every_steps": num(int, ge=1),
    "target_forget_acc": num(float, le=1) | None,
    "max_loss_ratio": num(float, gt=0),
    "max_loss": num(float, gt=0) | None,
    "scale": Literal["tiny", "paper"] | None,
    "precision": Precision,
}

_ADAPTERS: dict[Any, TypeAdapter] = {}


def type_error(tp: Any, value: Any) -> str | None:
    """Why ``value`` is not of the declared type ``tp`` (``None``: it is)."""
    key = repr(tp)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = TypeAdapter(tp)
    try:
        _ADAPTERS[key].validate_python(value)
    except ValidationError as e:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return f"{e.errors()[0]['msg']} (got {shown})"
    return None


def model_scale(model: torch.nn.Module) -> str:
    """``tiny`` below 100M parameters, else ``paper``."""
    n = sum(p.numel() for p in model.parameters())
    return "tiny" if n < TINY_MAX_PARAMS else "paper"


@dataclass
class UnlearnContext:
    """Everything a method may need to build its loss.

    ``reference`` is a frozen copy of the model before unlearning (only for
    methods with ``needs_reference``: NPO's log-ratio, RMU's retain
    activations).  ``hparams`` are the method's resolved hyperparameters
    (defaults for the model's scale, overridden by the user).
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    dataset: Dataset | None
    forget_seqs: list[list[int]]
    retain_seqs: list[list[int]]
    hparams: dict[str, Any]
    reference: torch.nn.Module | None = None
    seed: int = 0


class Method:
    """Base class of an unlearning method; subclasses set the class attributes.

    ``defaults[scale]`` mixes training settings (``lr``, ``optimizer``,
    ``epochs``, ``max_steps``, ``target_forget_acc``; these fill the
    :class:`rtteval.stages.unlearn.UnlearnConfig` fields the user left unset) and
    the method's own hyperparameters (everything else).  ``grid[scale]`` is the
    default sweep: a key that names an ``UnlearnConfig`` field sets that
    field, any other key sets a method hyperparameter.
    """

    name: ClassVar[str] = ""
    #: Dataset attribute holding this method's forget-side text.
    corpus: ClassVar[str] = "corpus"
    needs_reference: ClassVar[bool] = False
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    grid: ClassVar[dict[str, dict[str, list[Any]]]] = {}
    #: Keys of ``defaults`` that are this method's own hyperparameters.
    hparam_names: ClassVar[tuple[str, ...]] = ()
    #: The declared type of each hyperparameter (every name in ``hparam_names``).
    hparam_types: ClassVar[dict[str, Any]] = {}

    def build(self, ctx: UnlearnContext) -> tuple[LossFn, Trainable]:
        raise NotImplementedError

    @classmethod
    def default_hparams(cls, scale: str) -> dict[str, Any]:
        d = cls.defaults.get(scale) or cls.defaults["tiny"]
        return {k: v for k, v in d.items() if k in cls.hparam_names}

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        unknown = sorted(set(hparams) - set(cls.hparam_names))
        if unknown:
            raise ConfigError(
                f"method {cls.name!r} has no hyperparameter(s) {unknown}; "
                f"it takes {list(cls.hparam_names)}"
            )
        cls.check_params(hparams)

    @classmethod
    def param_error(cls, name: str, value: Any) -> str | None:
        """Why ``value`` is not valid for setting ``name`` (a hyperparameter or a training field).

        Checked when a config is loaded, so a negative learning rate in a
        study's grid fails before any job runs, not inside one.
        """
        tp = cls.hparam_types.get(name, TRAIN_PARAM_TYPES.get(name))
        return None if tp is None else type_error(tp, value)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Raise a ConfigError naming the first setting whose value is invalid."""
        for k, v in params.items():
            err = cls.param_error(k, v)
            if err:
                raise ConfigError(err, field=k)


# --------------------------------------------------------------------------- forward helpers


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a HF causal LM (Llama/Mistral/Qwen: ``model.model.layers``)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}")


class _StopForward(Exception):
    """Raised by the capture hook: nothing after layer ℓ is needed."""


def layer_activations(model: torch.nn.Module, batch: Batch, layer: int) -> torch.Tensor:
    """Residual-stream output of decoder layer ``layer`` ([B, T, D]).

    A forward hook captures the block's output and then aborts the forward
    pass, so the layers above ℓ and the LM head (most of an 8B model's
    compute for an early ℓ) are never run.  The captured tensor keeps its
    autograd graph.
    """
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        batch_logits(model, batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer {layer} was not reached in the forward pass")
    return captured[0]


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def layer_index(param_name: str) -> int | None:
    """The decoder-layer index in a parameter name (``model.layers.5.mlp...`` -> 5)."""
    m = _LAYER_RE.search(param_name)
    return int(m.group(1)) if m else None


def frozen_filter(frozen: list[int | str] | None) -> Trainable:
    """Trainable filter keeping some parameters fixed (``None``/empty: train all).

    An int freezes that decoder layer; a string freezes every parameter
    whose name contains it (``"embed_tokens"`` also freezes a tied LM head).
    """
    if not frozen:
        return None
    layers = {int(f) for f in frozen if isinstance(f, int) or str(f).isdigit()}
    names = [str(f) for f in frozen if not (isinstance(f, int) or str(f).isdigit())]
    return lambda n: layer_index(n) not in layers and not any(s in n for s in names)


def only_filter(names: list[str] | None) -> Trainable:
    """Trainable filter keeping only parameters whose name contains one of ``names``.

    ``None`` or an empty list: every parameter.  Tiny models unlearn with
    ``["embed_tokens"]`` (the token embeddings, tied to the LM head).
    """
    if not names:
        return None
    keep = [str(n) for n in names]
    return lambda n: any(s in n for s in keep)


def combine_filters(*filters: Trainable) -> Trainable:
    """A parameter is trained when every given filter (``None``: all) keeps it."""
    active = [f for f in filters if f is not None]
    if not active:
        return None
    return lambda n: all(f(n) for f in active)


@dataclass
class NllParts:
    """Forget and retain mean NLLs of one step (for logging)."""

    forget: torch.Tensor
    retain: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


def nll_pair(model: torch.nn.Module, batch: Batch) -> NllParts:
    """Mean token NLL on the forget batch and on the retain batch."""
    f = nll_loss(model, batch["forget"])
    r = nll_loss(model, batch["retain"])
    return NllParts(f, r, {"forget_nll": float(f.detach()), "retain_nll": float(r.detach())})


class NllPairMethod(Method):
    """Methods whose loss combines the NLL of a forget-side corpus with the retain NLL.

    GD ascends the forget NLL, RIA and FWF descend the NLL of wrong-answer
    prose; they differ only in ``corpus``, ``combine`` and defaults.
    """

    hparam_names = ("retain_coef",)
    hparam_types = {"retain_coef": num(float, ge=0)}
    combine: ClassVar[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]]
    grid = {
        "tiny": {"lr": [3e-4, 1e-3, 3e-3], "retain_coef": [1.0, 3.0]},
        # the paper's retain-coefficient sweep (docs/paper-fidelity.md), at the method's lr
        "paper": {"retain_coef": [0.0, 0.001, 0.01, 0.1, 1.0, 2.0, 4.0, 10.0, 100.0]},
    }

    def build(self, ctx: UnlearnContext) -> tuple[LossFn, Trainable]:
        lam = float(ctx.hparams["retain_coef"])
        combine = self.combine

        def loss_fn(model, batch):
            parts = nll_pair(model, batch)
            return combine(parts.forget, parts.retain, lam), parts.logs

        return loss_fn, None
