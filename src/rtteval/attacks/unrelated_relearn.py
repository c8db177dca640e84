"""Unrelated-data relearning: fine-tune on k texts that state no forget fact, measure V.

Ten unrelated examples restore most of RMU's hazardous knowledge (Łucki et
al., arXiv 2409.18025), and unrelated-data fine-tuning "almost completely"
recovers performance (Doshi & Stickland, arXiv 2411.12103).  If so, the
unlearning only hid the answers, and *any* small update undoes the hiding.
This attack fine-tunes every arm (unlearned, original, control) on k texts
from a third source — neither the forget splits nor the retain set (that is
``retain_relearn``) — for each k in ``ks``, and measures V after every epoch.

The source: for a synthetic world, its dev corpus (``corpus_dev``: the
prose and QA sentences of the dev facts, which pretraining saw and no
forget split states; in the world's vocabulary by construction); for any
dataset, ``corpus:`` names another source, a dataset directory (all its
``corpus_*.jsonl``) or one ``.jsonl`` file of ``{"text": ...}`` lines.  The
k texts are the first k of one seeded order, so a smaller k's texts are a
subset of a larger k's.  A k larger than the source is capped at its size
("all"), and ks that cap to the same number run once.

Provenance: every forget split's facts (T and V alike) are searched for in
the texts with :func:`rtteval.attacks.folds.check_provenance` (worlds: exact
by fact id and subject; data without fact ids: the fact matcher), right
before training; a text that states one raises ``ProvenanceError``.

The records are the shared ones, trained by :func:`rtteval.attacks.relearn.relearn`
(one call per k, at the one learning rate ``lr``): k takes the grid's lr
slot (``lrs: [10.0, 40.0]``; ``grid_axis: texts``) and the epochs are real
epochs, so the optimistic pick over (k, epoch) is selection's pick over
(lr, epoch) unchanged (docs/attacks.md).  There is no held-out slice, so
no honest pick.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from rtteval.attacks.base import AttackConfig, AttackContext, register_attack

if TYPE_CHECKING:
    from rtteval.attacks.folds import Fold
    from rtteval.attacks.records import ModelAttack
    from rtteval.data.types import Dataset, Passage

#: The recorded split of every training text: not a forget split, not retain.
UNRELATED = "unrelated"
#: The world's corpus file the texts come from when ``corpus`` is not given.
WORLD_SOURCE = "dev"


class UnrelatedRelearnConfig(AttackConfig):
    """Unrelated-data relearning in a study's ``attacks:`` (module docstring).

    ``ks``: numbers of texts to fine-tune on (``all``: every text of the
    source); ``corpus``: the source (a dataset directory or a ``.jsonl``
    file; default, for a world: its dev corpus); ``lr``: the one learning
    rate (the grid's lr slot holds k); the rest as RTT's.
    """

    name: Literal["unrelated_relearn"] = "unrelated_relearn"
    ks: list[Annotated[int, Field(ge=1)] | Literal["all"]] = Field([10, 100, "all"], min_length=1)
    corpus: str | None = Field(None, min_length=1)
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    optimizer: Literal["adamw", "lion"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    retain_eval: Literal["epoch", "end", "none"] = "epoch"

    title: ClassVar[str] = (
        "unrelated relearning: fine-tune on k texts stating no forget fact, measure V"
    )

    @field_validator("ks")
    @classmethod
    def _distinct(cls, v: list[int | str]) -> list[int | str]:
        if len(set(v)) != len(v):
            raise ValueError(f"ks has duplicates: {v}")
        return v

    @field_validator("corpus")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        """A missing source is the user's mistake: say so when the config loads, not in a job."""
        if v is not None and not Path(v).expanduser().exists():
            raise ValueError(f"{v}: no such file or directory")
        return v

    def resolved(self, seed: int, train_splits: int | None = None) -> dict[str, Any]:
        d = super().resolved(seed, train_splits)
        if self.corpus is not None:  # absolute, so the job key names the file, not the cwd
            d["corpus"] = str(Path(self.corpus).expanduser().resolve())
        return d


def source_texts(dataset: Dataset, corpus: str | None) -> tuple[list[Passage], str]:
    """The source's passages and a description of it (``corpus`` or the world's dev corpus)."""
    from rtteval.attacks.folds import is_world
    from rtteval.data import load_dataset
    from rtteval.data.loader import _parse_passage, _read_jsonl
    from rtteval.errors import ConfigError

    if corpus is None:
        if not is_world(dataset):
            raise ConfigError(
                f"dataset {dataset.name!r} is not a synthetic world: name the unrelated texts "
                'with corpus: (a dataset directory or a .jsonl file of {"text": ...} lines)',
                field="corpus",
            )
        passages = list(dataset.corpus.get(WORLD_SOURCE, []))
        return passages, f"{dataset.root}/corpus_{WORLD_SOURCE}.jsonl"
    path = Path(corpus).expanduser()
    if path.is_file():
        return [_parse_passage(obj, path, line) for line, obj in _read_jsonl(path)], str(path)
    if path.is_dir():
        other = load_dataset(path)
        return [p for ps in other.corpus.values() for p in ps], f"{path}/corpus_*.jsonl"
    raise ConfigError(f"{corpus}: no such file or directory", field="corpus")


def resolve_ks(ks: list[int | str], n: int) -> list[int]:
    """Each k as a number of texts (``all``, or more than there are: ``n``), duplicates once."""
    out: list[int] = []
    for k in ks:
        m = n if k == "all" else min(int(k), n)
        if m not in out:
            out.append(m)
    return sorted(out)


def unrelated_folds(
    dataset: Dataset, passages: list[Passage], k: int, vs: list[str], seed: int
) -> list[Fold]:
    """One fold per V on the first k texts of the seeded order; checked against every forget split."""
    from rtteval.attacks.folds import Fold, TrainItem, check_provenance

    order = list(range(len(passages)))
    random.Random(f"rtteval-unrelated-relearn/{seed}").shuffle(order)
    items = [
        TrainItem(
            passages[i].text, UNRELATED, f"{UNRELATED}#{i}",
            fact_id=None if passages[i].extra.get("fact_id") is None
            else str(passages[i].extra["fact_id"]),
            source=passages[i].source,
        )
        for i in order[:k]
    ]  # fmt: skip
    folds = [Fold(v, [], UNRELATED, items) for v in vs]
    # no fact of ANY forget split (T or V) may be in the texts
    for s in dataset.split_names:
        check_provenance(replace(folds[0], v=s, t=[UNRELATED]), dataset)
    return folds


@register_attack("unrelated_relearn")
class UnrelatedRelearn:
    """Fine-tune on k texts that state no forget fact; V per epoch (this module's docstring)."""

    name: ClassVar[str] = "unrelated_relearn"
    config_type: ClassVar[type[AttackConfig]] = UnrelatedRelearnConfig

    def run(self, config: dict[str, Any], ctx: AttackContext) -> ModelAttack:
        from rtteval.attacks.folds import fold_names
        from rtteval.attacks.relearn import relearn
        from rtteval.errors import DataError

        seed = int(config.get("seed", 0))
        cfg = UnrelatedRelearnConfig.from_job(config)
        dataset = ctx.dataset
        vs = fold_names(dataset, ctx.folds)
        passages, where = source_texts(dataset, cfg.corpus)
        if not passages:
            raise DataError(f"{dataset.name}: no unrelated text to train on ({where})")
        ks = resolve_ks(list(cfg.ks), len(passages))
        scoring = ctx.scoring_or_default()
        record = {**cfg.resolved(seed), "folds": vs, "text_format": UNRELATED, "source": where,
                  "n_source_texts": len(passages), "grid_axis": "texts",
                  "lrs": [float(k) for k in ks]}  # fmt: skip
        parts: list[ModelAttack] = []
        for k in ks:  # one relearn() per k, at the one lr; k goes in the lr slot below
            fs = unrelated_folds(dataset, passages, k, vs, seed)  # checked right before training
            settings = SimpleNamespace(**{**cfg.model_dump(), "lrs": [cfg.lr], "replicates": 1,
                                          "precision": cfg.precision or "auto", "seed": seed})  # fmt: skip
            parts.append(
                relearn(
                    ctx.model,
                    ctx.tokenizer,
                    dataset,
                    fs,
                    settings,
                    scoring,
                    config=record,
                    retain_questions=ctx.retain_questions,
                    label=ctx.label,
                    name=f"unrelated-relearn k={k}",
                    progress=ctx.progress,
                    log=ctx.log,
                )  # fmt: skip
            )
        first = parts[0]
        for fi, fold in enumerate(first.folds):
            fold.runs = [replace(r, lr=float(k)) for k, p in zip(ks, parts, strict=True)
                         for r in p.folds[fi].runs]  # fmt: skip
            # the largest k's texts include every smaller k's (one seeded order)
            fold.provenance = {**parts[-1].folds[fi].provenance, "n_train_texts_per_k": ks}
        first.wall_time = sum(p.wall_time for p in parts)
        return first
