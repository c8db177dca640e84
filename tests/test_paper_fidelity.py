"""rtteval's paper settings equal docs/paper-fidelity.md's table, and the doc is the table's rendering."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from rtteval.attacks.rtt import RTTConfig, RTTSpec
from rtteval.config.study import FinetuneSpec, load_config
from rtteval.fidelity import load_settings, render_markdown
from rtteval.methods import METHODS
from rtteval.scoring import ScoringConfig
from rtteval.stages.finetune import FinetuneConfig
from rtteval.stages.unlearn import UnlearnConfig, apply_point, expand_grid, resolve_config

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = {p.stem: p for p in sorted((ROOT / "configs" / "paper").glob("*.yaml"))}
ROWS = [r for r in load_settings()["settings"] if r.get("check")]


def _norm(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_norm(x) for x in v]
    return v


def _study(stem: str):
    return load_config(PAPER_CONFIGS[stem], check_paths=False).config


def _unlearn_points(method: str, stems: list[str]) -> list[UnlearnConfig]:
    """The paper-scale default, or every resolved grid point of ``method`` in the given configs."""
    m = METHODS[method]()
    out = []
    for stem in stems:
        for spec in _study(stem).methods:
            if spec.name != method:
                continue
            for point in expand_grid(dict(spec.grid)):
                cfg = apply_point(UnlearnConfig(method=method), {**spec.fixed, **point})
                out.append(resolve_config(cfg, m, "paper"))
    return out or [resolve_config(UnlearnConfig(method=method), m, "paper")]


def _rtt(study: Any) -> RTTSpec:
    """The study's RTT entry of ``attacks:``."""
    return next(a for a in study.attacks if a.name == "rtt")


def _resolved(check: dict[str, Any]) -> list[Any]:
    """Every value rtteval resolves for a checked setting (defaults and each paper config)."""
    at, field = check["at"], check["field"]
    stems = check.get("configs") or list(PAPER_CONFIGS)
    if at.startswith("unlearn."):
        method = at.split(".", 1)[1]
        pts = _unlearn_points(method, check["configs"]) if check.get("configs") else (
            _unlearn_points(method, []) + _unlearn_points(method, stems)
        )  # fmt: skip
        return [getattr(p, field) if hasattr(p, field) else p.hparams[field] for p in pts]
    if at == "attack":
        vals = [asdict(RTTConfig.paper())[field]]
        return vals + [_rtt(_study(s)).resolved(seed=0)[field] for s in stems]
    if at == "finetune":
        vals = [FinetuneConfig.paper().model_dump()[field]]
        studies = [_study(s) for s in stems]
        ft = [
            s.finetune.resolved(tiny=False)
            for s in studies
            if any(d.finetune_first for d in s.datasets)
        ]
        assert ft, "no paper config has a fine-tune-first stage"
        return vals + [d[field] for d in ft]
    if at == "scoring":
        return [asdict(ScoringConfig())[field]]
    if at.startswith("dataset."):
        (ds,) = _study(at.split(".", 1)[1]).datasets
        return [getattr(ds, field)]
    raise AssertionError(f"unknown check target {at!r}")


def test_the_doc_is_the_tables_rendering():
    doc = (ROOT / "docs" / "paper-fidelity.md").read_text(encoding="utf-8")
    assert doc == render_markdown(), (
        "regenerate: python -m rtteval.fidelity > docs/paper-fidelity.md"
    )


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['section']}: {r['setting']}" for r in ROWS])
def test_resolved_settings_equal_the_table(row):
    check = row["check"]
    got = [_norm(v) for v in _resolved(check)]
    if "values" in check:
        assert sorted(set(got)) == sorted(check["values"]), row["setting"]
    else:
        assert got and all(v == _norm(check["value"]) for v in got), (row["setting"], got)


def test_every_paper_config_and_method_is_covered():
    """A paper config or method the table never looks at would escape the check."""
    stems = {s for r in ROWS for s in r["check"].get("configs", [])}
    assert stems >= set(PAPER_CONFIGS) - {"random_bd_llama3_8b"}
    assert {r["check"]["at"] for r in ROWS} >= {
        "unlearn.gd", "unlearn.ria", "unlearn.fwf", "unlearn.rmu", "attack", "finetune", "scoring",
    }  # fmt: skip
    for stem in PAPER_CONFIGS:
        assert {m.name for m in _study(stem).methods} == {"gd", "ria", "fwf", "rmu"}, stem


def test_explicit_null_grad_clip_means_no_clipping():
    """``grad_clip: null`` written out turns clipping off; left out, the default holds."""
    assert RTTSpec().resolved(seed=0)["grad_clip"] == 1.0
    assert RTTSpec(grad_clip=None).resolved(seed=0)["grad_clip"] is None
    assert RTTSpec(grad_clip=0.5).resolved(seed=0)["grad_clip"] == 0.5
    assert FinetuneSpec().resolved(tiny=True)["grad_clip"] == 1.0
    assert FinetuneSpec(grad_clip=None).resolved(tiny=True)["grad_clip"] is None
    gd = METHODS["gd"]()
    assert resolve_config(UnlearnConfig(method="gd"), gd, "tiny").grad_clip == 1.0
    none = apply_point(UnlearnConfig(method="gd"), {"grad_clip": None})
    assert resolve_config(none, gd, "tiny").grad_clip is None


def test_random_birthdays_keeps_splits_5_to_9_as_retain(shared_datasets, tmp_path):
    """The paper config forgets split_0..4; split_5..9 become retain data, never forget folds."""
    from rtteval.data import load_dataset
    from rtteval.runner.plan import build_plan
    from rtteval.stages.unlearn import retain_data

    rb = load_dataset(shared_datasets / "random_bd")
    forget, retain = rb.split_off([f"split_{k}" for k in range(5, 10)])
    assert forget.split_names == [f"split_{k}" for k in range(5)]
    assert retain.split_names == [f"split_{k}" for k in range(5, 10)]
    assert set(forget.corpus) & set(retain.corpus) <= {"dev"}
    r = retain_data(forget, retain)
    assert {q.question for q in r.eval_questions} <= {
        q.question for k in (5, 7, 9) for q in rb.splits[f"split_{k}"]
    }
    cfg = load_config(
        PAPER_CONFIGS["random_bd_llama3_8b"],
        [f"datasets.0.path={shared_datasets / 'random_bd'}", f"output_dir={tmp_path}"],
        check_paths=False,
    ).config
    plan = build_plan(cfg, dry_run=True)
    folds = {j.job.config["fold"] for j in plan.jobs if j.job.stage == "attack"}
    assert folds == {f"split_{k}" for k in range(5)}


def test_mcq_answer_finetuning_puts_the_loss_on_the_answer_only(pretrained_tiny, monkeypatch):
    """FinetuneConfig.paper()'s loss: every answered MCQ once, loss on `` L. choice`` and EOS only."""
    import rtteval.stages.finetune as ft
    from rtteval.data import load_dataset
    from rtteval.models import load_model
    from rtteval.scoring import continuation_ids, format_mcq

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ft, "learn_and_save", lambda m, t, batches, *a, **k: seen.update(b=batches))
    model, tok = load_model(pretrained_tiny["control"], device="cpu")
    ds = load_dataset(pretrained_tiny["world"])
    ft.finetune_facts(model, tok, ds, "unused", FinetuneConfig.paper(max_epochs=1), progress=False)
    got = sorted(
        (tuple(ids[m.bool()].tolist()), tuple(lab[lab != -100].tolist()))
        for b in seen["b"](0)
        for ids, m, lab in zip(b["input_ids"], b["attention_mask"], b["labels"], strict=True)
    )
    want = []
    for q in ds.questions():
        prompt, text = format_mcq(q), format_mcq(q, with_answer=True)
        ctx, cont = continuation_ids(tok, prompt, text[len(prompt) :])
        want.append((tuple(ctx + cont + [tok.eos_token_id]), tuple(cont + [tok.eos_token_id])))
    assert got == sorted(want)
