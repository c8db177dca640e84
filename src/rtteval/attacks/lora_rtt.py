"""LoRA-RTT: RTT with LoRA adapters on a frozen base.

Full fine-tuning of an 8B model needs its gradients and optimizer state
beside the weights; the relearning attacks of the literature are mostly LoRA
(Łucki et al., arXiv 2409.18025; Che et al., arXiv 2502.05209).  This is
RTT's protocol unchanged — the same folds, provenance check, arms, lr x
epoch grid, selection and results schema (:mod:`rtteval.attacks.rtt`) — but
only LoRA adapters are trained; the base weights never move.

The adapters are peft's (``LoraConfig`` on the model in place), so what
:func:`attach_lora` builds is saved with ``save_pretrained`` and loaded with
``PeftModel.from_pretrained`` like any peft adapter.  Every (fold, lr) run
starts from the same adapter initialisation (seeded; B = 0, so the attacked
model starts as the model given) and the adapters are removed afterwards:
the caller gets its model back unchanged, with its ``requires_grad`` flags.
The learning rates train together as one batched model by default
(:class:`LoraEnsemble`: one frozen base, an adapter per lr, ``bmm``), which
gives the numbers of training each adapter alone up to float rounding.

Defaults: ``rank`` 8, ``alpha`` 2 x rank, ``dropout`` 0, the attention and
MLP projections (peft's ``all-linear``: every linear layer but the output
head), and the lr grid 1e-3, 3e-3, 1e-2 (LoRA's effective step is smaller
than full fine-tuning's, so its lrs sit higher than RTT's), chosen for the
micro and tiny models.  ``paper: true`` starts from RTT's paper preset (6
epochs, batch 4, the MCQ loss, all of T) with the literature's LoRA: rank
128 and lrs around 2e-4 (Łucki et al.), alpha = 2 x rank (Che et al.'s
rank 16, alpha 32), AdamW, as those papers train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from rtteval.attacks.base import AttackConfig, AttackContext, register_attack
from rtteval.attacks.rtt import RTTSpec
from rtteval.training.grid import LrGrid

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from rtteval.attacks.folds import Fold
    from rtteval.attacks.records import ModelAttack
    from rtteval.attacks.rtt import RTTConfig
    from rtteval.data.types import Dataset
    from rtteval.scoring import ScoringConfig

#: The adapter settings; everything else is RTT's.
LORA_FIELDS = ("rank", "ranks", "alpha", "dropout", "target_modules")
#: ``config.grid_axis`` of a rank grid: each run's ``lr`` slot is its point's 1-based position.
RANK_GRID_AXIS = "rank x lr"
#: peft's name for "every linear layer but the output head": the attention and MLP projections.
ALL_LINEAR = "all-linear"
TINY_DEFAULTS: dict[str, Any] = {"lrs": [1e-3, 3e-3, 1e-2]}
PAPER_DEFAULTS: dict[str, Any] = {"lrs": [1e-4, 2e-4, 4e-4], "optimizer": "adamw"}
PAPER_RANK = 128


class LoraRTTSpec(RTTSpec):
    """LoRA-RTT in a study's ``attacks:``: RTT's fields plus the adapter's (module docstring).

    ``rank`` (default 8; 128 with ``paper: true``), or ``ranks``: a rank
    grid, crossed with the lrs (the attacker selects over rank x lr x
    epoch; each rank's lrs train as one batch, ranks one after another),
    ``alpha`` (default 2 x rank, per rank), ``dropout`` (0), ``target_modules`` (module names;
    default the attention and MLP projections), ``batched`` (the lr grid as one model of
    stacked adapters; default: when there are 2+ lrs).  RTT's fields keep RTT's meaning;
    unset ``lrs`` (and with ``paper``, ``optimizer``) take LoRA's defaults.
    """

    name: Literal["lora_rtt"] = "lora_rtt"  # type: ignore[assignment]
    rank: int | None = Field(None, ge=1)
    ranks: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    #: The lr grid as one :class:`LoraEnsemble` (None: when there are 2+ lrs); numbers equal up to rounding.
    batched: bool | None = None

    title: ClassVar[str] = (
        "LoRA-RTT: LoRA adapters fine-tuned on the other forget splits (T), measure V"
    )

    @field_validator("ranks")
    @classmethod
    def _one_rank_setting(cls, ranks: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if ranks is not None and info.data.get("rank") is not None:
            raise ValueError("give rank or ranks, not both")
        if ranks is not None and len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks has duplicates: {ranks}")
        return ranks

    def lora(self) -> dict[str, Any]:
        """The resolved adapter settings (stored in job keys and results under ``lora``).

        A rank grid (``ranks`` with 2+ ranks) stores ``ranks`` and ``alphas``
        (one per rank) instead of ``rank`` and ``alpha``.
        """
        if self.ranks is not None and len(self.ranks) > 1:
            return {
                "ranks": list(self.ranks),
                "alphas": [self.alpha if self.alpha is not None else 2.0 * r for r in self.ranks],
                "dropout": self.dropout,
                "target_modules": self.target_modules or ALL_LINEAR,
            }
        rank = self.ranks[0] if self.ranks else self.rank
        rank = rank if rank is not None else (PAPER_RANK if self.paper else 8)
        return {
            "rank": rank,
            "alpha": self.alpha if self.alpha is not None else 2.0 * rank,
            "dropout": self.dropout,
            "target_modules": self.target_modules or ALL_LINEAR,
        }

    def resolved(self, seed: int, train_splits: int | None = None) -> dict[str, Any]:
        """RTT's resolved settings (with LoRA's lr defaults) plus ``lora``."""
        given = self.model_dump(exclude={"name", "batched", *LORA_FIELDS}, exclude_unset=True)
        for k, v in (PAPER_DEFAULTS if self.paper else TINY_DEFAULTS).items():
            given.setdefault(k, v)
        d = RTTSpec.model_validate(given).resolved(seed, train_splits)
        d["lora"] = self.lora()
        if self.batched is not None:  # absent by default: job keys do not move
            d["batched"] = self.batched
        return d


def is_lora_param(name: str) -> bool:
    """The parameters LoRA-RTT trains: the adapters' A and B."""
    return "lora_" in name


def attach_lora(model: torch.nn.Module, lora: dict[str, Any], seed: int = 0) -> PeftModel:
    """Wrap ``model`` in place with a peft LoRA adapter per ``lora`` (``LoraRTTSpec.lora()``).

    The adapter's A is initialised from ``seed``; B is zero, so the wrapped
    model computes what ``model`` did.  ``peft_model.unload()`` removes it.
    """
    import warnings

    from peft import LoraConfig, get_peft_model

    from rtteval.errors import ConfigError

    cfg = LoraConfig(
        r=int(lora["rank"]),
        lora_alpha=float(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        target_modules=lora["target_modules"],
        bias="none",
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # peft reads a property transformers deprecates
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            return get_peft_model(model, cfg)
    except ValueError as e:  # target modules not found in the model
        raise ConfigError(f"LoRA: {e}".splitlines()[0], field="target_modules") from None
    finally:
        torch.random.set_rng_state(state)


class LoraEnsemble(LrGrid):
    """The lr grid as one batched model: one frozen base, G LoRA adapters stacked.

    Memory grows with adapters, not with copies of the model: each LoRA
    layer's A and B are stacked ``[G, ...]`` (views of one flat buffer per
    member, as :class:`rtteval.training.grid.LrGrid`'s, so :func:`rtteval.training.loop.train`
    optimizes, clips and freezes per member), and a forward hook on the layer
    adds member g's ``B_g A_g x`` to the shared base output with ``bmm``.
    peft's own adapters are switched off while the ensemble lives
    (:meth:`close` switches them back on and removes the hooks).
    ``members[g]`` runs the peft model with member g's adapter.
    """

    def __init__(self, peft_model: PeftModel, lrs: Sequence[float]):
        from peft.tuners.lora import LoraLayer

        torch.nn.Module.__init__(self)
        self.lrs = [float(lr) for lr in lrs]
        g = len(self.lrs)
        self.__dict__["batched"] = peft_model
        self._mode: int | str = "off"
        self._layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        self._base = [p for n, p in peft_model.named_parameters() if not is_lora_param(n)]
        pairs = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in self._layers]
        p0 = pairs[0][0]
        n = sum(a.numel() + b.numel() for a, b in pairs)
        self._flat = torch.zeros(g, n, device=p0.device, dtype=p0.dtype)
        self._flat_grad = torch.zeros_like(self._flat)
        self._stacked: list[tuple[torch.Tensor, torch.Tensor]] = []
        start = 0
        for a, b in pairs:
            views = []
            for w in (a, b):
                span = slice(start, start + w.numel())
                start += w.numel()
                v = self._flat[:, span].view(g, *w.shape).requires_grad_(True)
                v.grad = self._flat_grad[:, span].view(g, *w.shape)
                views.append(v)
            self._stacked.append((views[0], views[1]))
        self.members = torch.nn.ModuleList(_Member(self, k) for k in range(g))
        peft_model.base_model.disable_adapter_layers()
        self._hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self._layers)]
        self.reset_(peft_model)

    @staticmethod
    def unsupported(peft_model: torch.nn.Module) -> str | None:
        """Why the adapters cannot be stacked (a LoRA layer that is not a linear one), or None."""
        from peft.tuners.lora import LoraLayer

        for name, m in peft_model.named_modules():
            if isinstance(m, LoraLayer) and "default" not in m.lora_A:
                return f"the LoRA layer {name} ({type(m).__name__}) is not a linear one"
        return None

    @classmethod
    def factory(cls, batched: bool | None) -> Callable[[torch.nn.Module, Sequence[float]], Any]:
        """For :func:`relearn`: an ensemble, or None (lr by lr) when it cannot be one and not insisted on."""
        from rtteval.errors import ConfigError

        def make(model: torch.nn.Module, lrs: Sequence[float]) -> LoraEnsemble | None:
            reason = cls.unsupported(model)
            if reason is None:
                return cls(model, lrs)  # type: ignore[arg-type]
            if batched:
                raise ConfigError(f"batched LoRA-RTT impossible: {reason}", field="batched")
            return None

        return make

    def _hook(self, i: int) -> Callable[..., torch.Tensor | None]:
        layer = self._layers[i]

        def add_adapter(_mod: torch.nn.Module, args: tuple, out: torch.Tensor):
            if self._mode == "off":
                return None
            a, b = self._stacked[i]
            x = layer.lora_dropout["default"](args[0]).to(a.dtype)
            s = layer.scaling["default"]
            if self._mode == "batched":  # rows are member-major: member g's are the g-th block
                xg = x.reshape(len(self.lrs), -1, x.shape[-1])
                d = torch.bmm(torch.bmm(xg, a.transpose(1, 2)), b.transpose(1, 2))
            else:
                k = int(self._mode)
                d = (x @ a[k].t()) @ b[k].t()
            return out + (d * s).reshape(out.shape).to(out.dtype)

        return add_adapter

    @torch.no_grad()
    def reset_(self, model: torch.nn.Module) -> None:
        """Every member starts from the peft model's current adapter (RTT: before each fold)."""
        for layer, (a, b) in zip(self._layers, self._stacked, strict=True):
            a.copy_(layer.lora_A["default"].weight.expand_as(a))
            b.copy_(layer.lora_B["default"].weight.expand_as(b))
        self._flat_grad.zero_()

    @torch.no_grad()
    def load_member_(
        self, g: int | list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Put member g's adapter (or saved values) into peft's own; returns what was there."""
        old = []
        for i, layer in enumerate(self._layers):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            old.append((a.clone(), b.clone()))
            new = self._stacked[i] if isinstance(g, int) else g[i]
            a.copy_(new[0][g] if isinstance(g, int) else new[0])
            b.copy_(new[1][g] if isinstance(g, int) else new[1])
        return old

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        for p in self._base:  # frozen: no gradient for the base (train() re-enables all)
            p.requires_grad_(False)
        self._mode = "batched"
        try:
            return super().forward(input_ids, **kwargs)
        finally:
            self._mode = "off"

    def close(self) -> None:
        """Remove the hooks and switch peft's adapters back on."""
        for h in self._hooks:
            h.remove()
        self.batched.base_model.enable_adapter_layers()


class _Member(torch.nn.Module):
    """Member g of a :class:`LoraEnsemble`: the peft model with adapter g (for evaluation)."""

    def __init__(self, owner: LoraEnsemble, k: int):
        super().__init__()
        self.__dict__["owner"] = owner
        self.model = owner.batched  # registered: scoring reads its parameters' device
        self.k = k

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.owner._mode = self.k
        try:
            return self.model(*args, **kwargs)
        finally:
            self.owner._mode = "off"


@register_attack("lora_rtt")
class LoraRTT:
    """RTT with LoRA adapters on a frozen base (this module's docstring)."""

    name: ClassVar[str] = "lora_rtt"
    config_type: ClassVar[type[AttackConfig]] = LoraRTTSpec
    #: ``config["save_adapters"]`` (a directory; the CLI's and the runner's) gets every run's adapter.
    saves_adapters: ClassVar[bool] = True

    def run(self, config: dict[str, Any], ctx: AttackContext) -> ModelAttack:
        """RTT's folds and grid on a LoRA-wrapped ``model``; the adapters are removed afterwards."""
        from rtteval.attacks.folds import build_folds, check_provenance, resolve_text_format
        from rtteval.attacks.rtt import RTTConfig

        model, dataset = ctx.model, ctx.dataset
        cfg = RTTConfig.from_dict(config)
        if ctx.folds:
            cfg.folds = list(ctx.folds)
        cfg.validate()
        lora = dict(config["lora"])
        scoring = ctx.scoring_or_default()
        fs = build_folds(dataset, cfg)
        for f in fs:  # before any training, on the very texts trained on
            check_provenance(f, dataset)
        record = {**cfg.to_dict(), "lora": lora, "folds": [f.v for f in fs]}
        record["text_format"] = fs[0].text_format if fs else resolve_text_format(dataset, cfg)
        if "batched" in config:
            record["batched"] = config["batched"]
        save = Path(config["save_adapters"]) if config.get("save_adapters") else None
        # one batch of adapters per rank (stacked adapters need equal shapes), ranks in turn
        ranks = list(zip(lora["ranks"], lora["alphas"], strict=True)) if "ranks" in lora else [
            (lora["rank"], lora["alpha"])]  # fmt: skip
        parts = []
        for rank, alpha in ranks:
            one = {**{k: v for k, v in lora.items() if k not in ("ranks", "alphas")},
                   "rank": rank, "alpha": alpha}  # fmt: skip
            where = (save / f"rank{rank}") if save is not None and len(ranks) > 1 else save
            parts.append(self._one_rank(model, ctx.tokenizer, dataset, fs, cfg, scoring, one,
                                        config, record, where,
                                        retain_questions=ctx.retain_questions, label=ctx.label,
                                        progress=ctx.progress, log=ctx.log))  # fmt: skip
        return parts[0] if len(parts) == 1 else rank_grid(parts, [r for r, _ in ranks], record)

    @staticmethod
    def _one_rank(
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        dataset: Dataset,
        fs: Sequence[Fold],
        cfg: RTTConfig,
        scoring: ScoringConfig,
        lora: dict[str, Any],
        config: dict[str, Any],
        record: dict[str, Any],
        save: Path | None,
        **kw: Any,
    ) -> ModelAttack:
        """The lr grid at one rank: one batch of adapters (or lr by lr); adapters removed after."""
        from rtteval.attacks.relearn import relearn

        flags = [p.requires_grad for p in model.parameters()]
        peft_model = attach_lora(model, lora, seed=cfg.seed)
        try:
            return relearn(
                peft_model, tokenizer, dataset, fs, cfg, scoring, config=record, name="LoRA-RTT",
                trainable=is_lora_param, make_ensemble=LoraEnsemble.factory(config.get("batched")),
                batched=config.get("batched"),
                after_run=None if save is None else adapter_saver(peft_model, save), **kw,
            )  # fmt: skip
        finally:
            peft_model.unload()  # puts the original layers back into ``model``
            for p, flag in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(flag)


def rank_grid(
    parts: Sequence[ModelAttack], ranks: Sequence[int], record: dict[str, Any]
) -> ModelAttack:
    """One record of a rank x lr grid: each run's ``lr`` slot is its point's 1-based position.

    The records are keyed by lr (selection, the report, the budget curves all
    read ``lrs``), so a grid over two settings takes the form the attacks that
    do not train use (``config.grid_axis``, :data:`RANK_GRID_AXIS`):
    ``config.grid`` lists the ``{"rank", "lr"}`` of every position, rank by
    rank, so ties in selection go to the smaller rank, then the smaller lr.
    """
    grid = [{"rank": r, "lr": lr} for r in ranks for lr in record["lrs"]]
    pos = {(r, float(lr)): i + 1.0 for i, (r, lr) in enumerate((g["rank"], g["lr"]) for g in grid)}
    folds = []
    for fi, f in enumerate(parts[0].folds):
        runs = [
            dc_replace(run, lr=pos[r, run.lr]) for r, part in zip(ranks, parts, strict=True)
            for run in part.folds[fi].runs
        ]  # fmt: skip
        folds.append(dc_replace(f, runs=runs))
    config = {**record, "grid_axis": RANK_GRID_AXIS, "grid": grid, "lrs": sorted(pos.values())}
    return dc_replace(parts[0], config=config, folds=folds,
                      wall_time=sum(p.wall_time for p in parts))  # fmt: skip


def adapter_saver(
    peft_model: PeftModel, root: Path
) -> Callable[[Fold, float, int, torch.nn.Module, int | None], None]:
    """For :func:`relearn`'s ``after_run``: save each run's trained adapter in peft's format.

    ``root/<V>/lr<lr>[_rep<k>]`` holds ``adapter_config.json`` and the
    weights, so ``PeftModel.from_pretrained(base, dir)`` gives the attacked
    model after the run's last epoch.  A batched run's member is copied into
    peft's adapter for the save, which then gets its initial values back.
    """

    def save(fold: Fold, lr: float, rep: int, trained: torch.nn.Module, g: int | None) -> None:
        where = root / fold.v / (f"lr{lr:g}" + (f"_rep{rep}" if rep else ""))
        if g is None:
            peft_model.save_pretrained(where)
            return
        assert isinstance(trained, LoraEnsemble)
        init = trained.load_member_(g)
        try:
            peft_model.save_pretrained(where)
        finally:
            trained.load_member_(init)

    return save
