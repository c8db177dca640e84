"""The attack seam: every registered attack runs on the micro model; retain-only relearning end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rtteval.attacks import ATTACKS, AttackContext, get_attack
from rtteval.attacks.folds import ProvenanceError
from rtteval.attacks.records import ModelAttack
from rtteval.attacks.retain_relearn import RETAIN, retain_folds
from rtteval.config.study import load_config
from rtteval.data import load_dataset
from rtteval.data.world import QA_TEMPLATE
from rtteval.models import load_model, snapshot_state
from rtteval.runner.plan import build_plan
from rtteval.stages.pretrain import retain_eval_name
from rtteval.stages.unlearn import retain_data
from tests.attacks._nontraining import micro_study


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_registered_attack_runs_and_yields_records(name: str, pretrained_tiny) -> None:
    """A new attack is tested here automatically: it trains (or, if it does not, yields one point
    per setting), measures V, restores the model."""
    attack = get_attack(name)
    spec = attack.config_type(name=name)
    settings = spec.resolved(seed=0)
    trains = attack.config_type.trains
    if trains:  # one lr (an attack whose lr slot holds another setting has one `lr`)
        settings.update({"lrs": [3e-3]} if "lrs" in settings else {"lr": 3e-3}, epochs=2)
    ds = load_dataset(pretrained_tiny["world"])
    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    before = {k: v.clone() for k, v in snapshot_state(model).items()}
    r_name = retain_eval_name(ds)
    ctx = AttackContext(
        model, tok, ds, folds=["split_0"], retain_questions=ds.retain[r_name], label="orig"
    )
    a = attack.run(settings, ctx)
    assert isinstance(a, ModelAttack) and [f.v for f in a.folds] == ["split_0"]
    (fold,) = a.folds
    assert fold.provenance["checked"] and len(fold.question_ids) == len(ds.splits["split_0"])
    if trains:
        assert len(fold.runs) == len(a.lrs) > 0
        for run in fold.runs:
            assert run.status == "completed" and [e.epoch for e in run.epochs] == [1, 2]
            assert len(fold.question_ids) == len(run.epochs[-1].v_correct)
            assert run.epochs[-1].loss < run.epochs[0].loss  # it trained: the loss fell
        assert a.grid() == [(lr, ep) for lr in a.lrs for ep in (1, 2)]
    else:  # one completed point per setting, in the lr slot at epoch 1, with no training loss
        assert len(fold.runs) == len(a.lrs) > 0 and a.config["epochs"] == 1
        for run in fold.runs:
            assert run.status == "completed" and [e.epoch for e in run.epochs] == [1]
            assert run.steps == 0 and run.epochs[0].loss is None
            assert len(run.epochs[0].v_correct) == len(fold.question_ids)
            assert run.epochs[0].retain_acc is not None
        assert a.grid() == [(lr, 1) for lr in a.lrs] and len(a.curve_points()) == len(a.lrs)
    # the schema round-trips, and the caller's model is unchanged
    assert ModelAttack.from_dict(json.loads(json.dumps(a.to_dict()))).to_dict() == a.to_dict()
    assert all(torch.equal(before[k], v) for k, v in snapshot_state(model).items())


def test_retain_relearn_trains_on_retain_text_and_never_on_a_forget_fact(pretrained_tiny) -> None:
    ds = load_dataset(pretrained_tiny["world"])
    rd = retain_data(ds)
    folds = retain_folds(ds, rd.texts, rd.text_sources, ["split_0", "split_1"])
    assert [f.v for f in folds] == ["split_0", "split_1"] and all(f.t == [] for f in folds)
    items = folds[0].items
    assert len(items) == len(rd.texts) > 0 and {it.split for it in items} == {RETAIN}
    # independent of the check: no forget subject or forget question occurs in any text
    forget = [q for s in ds.split_names for q in ds.splits[s]]
    text = "\n".join(it.text for it in items)
    assert not [q for q in forget if q.question in text]
    assert not [q for q in forget if re.search(rf"\b{re.escape(q.extra['subject'])}\b", text)]
    # a fact of a split that is not attacked (T, not V) is refused just the same
    q = ds.splits["split_3"][0]
    leaked = [*rd.texts, QA_TEMPLATE.format(question=q.question, answer=q.answer_text)]
    with pytest.raises(ProvenanceError, match="split_3"):
        retain_folds(ds, leaked, None, ["split_0"])


def test_retain_relearn_runs_from_yaml_beside_rtt_and_is_its_own_report_row(
    tmp_path: Path, cli, pretrained_tiny
) -> None:
    out = tmp_path / "out"
    p = tmp_path / "seam.yaml"
    p.write_text(
        micro_study(
            "seam",
            out,
            pretrained_tiny,
            [
                "{name: rtt, lrs: [3.0e-3], epochs: 1, folds: [split_0]}",
                "{name: retain_relearn, lrs: [3.0e-3], epochs: 2, folds: [split_0]}",
            ],
            plots=False,
        )
    )
    res = cli("run", p)
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    rows = {(e["dataset"], e["attack"]) for e in results["summary"]}
    assert rows == {("w", "rtt"), ("w [retain_relearn]", "retain_relearn")}
    rr = [a for a in results["attacks"] if a["config"]["text_format"] == RETAIN]
    assert {a["role"] for a in rr} == {"original", "control", "unlearned"}
    for a in rr:
        (f,) = a["folds"]
        prov = f["provenance"]
        assert (
            f["t"] == []
            and prov["text_format"] == RETAIN
            and set(prov["train_texts_per_split"]) == {RETAIN}
        )
        assert a["config"]["epochs"] == 2 and len(f["runs"][0]["epochs"]) == 2
    md = (out / "report.md").read_text()
    assert "`retain_relearn`: retain-only relearning" in md and "| w [retain_relearn] |" in md
    # the findings are RTT's: the other attack's rows stay out of them
    f = cli("findings", out)
    assert f.returncode == 0, f.stderr
    assert "retain_relearn" not in (out / "findings.md").read_text()
    # each attack's jobs are their own: adding one leaves RTT's job keys as they were
    both = build_plan(load_config(p, check_paths=False).config)
    alone = build_plan(load_config(p, ["attacks=[{name: rtt, lrs: [3.0e-3], epochs: 1, "
                                       "folds: [split_0]}]"], check_paths=False).config)  # fmt: skip
    keys = {j.job.key: j.job.config["attack"] for j in both.jobs if j.job.stage == "attack"}
    rtt_alone = {j.job.key for j in alone.jobs if j.job.stage == "attack"}
    assert {k for k, a in keys.items() if a == "rtt"} == rtt_alone and len(keys) == 6


def test_retain_relearn_from_the_cli(tmp_path: Path, cli, pretrained_tiny) -> None:
    base = [
        "attack", "--attack", "retain_relearn", "--model", pretrained_tiny["control"],
        "--original", pretrained_tiny["original"], "--data", pretrained_tiny["world"],
        "--lrs", "3e-3", "--epochs", "1", "--folds", "split_1", "--n-boot", "20",
        "--method-name", "never",
    ]  # fmt: skip
    bad = cli(*base, "--out", tmp_path / "bad", "--text-format", "qa")
    assert bad.returncode == 2
    assert "attack 'retain_relearn' has no setting 'text_format'" in bad.stderr
    assert not (tmp_path / "bad").exists()
    unknown = cli(
        *[("nope" if a == "retain_relearn" else a) for a in base], "--out", tmp_path / "x"
    )
    assert unknown.returncode == 2 and "unknown attack 'nope'" in unknown.stderr
    r = cli(*base, "--out", tmp_path / "rr")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "rr" / "results.json").read_text())
    (s,) = res["summary"]
    assert (s["dataset"], s["attack"], s["method"]) == (
        "tiny [retain_relearn]",
        "retain_relearn",
        "never",
    )
    assert {a["role"] for a in res["attacks"]} == {"original", "unlearned"}
    assert all(a["config"]["text_format"] == RETAIN for a in res["attacks"])


@pytest.mark.parametrize(
    ("attacks", "expect"),
    [
        (
            "attack:\n  lrs: [1.0e-3]\n",
            "study.yaml:8: field 'attack': 'attack:' is now 'attacks:', a list selecting attacks",
        ),
        (
            "attacks:\n  - name: rtt\n  - name: rtt_v2\n",
            "study.yaml:10: field 'attacks.1.name': unknown attack 'rtt_v2'; known: "
            + ", ".join(sorted(ATTACKS)),
        ),
        (
            "attacks:\n  - name: retain_relearn\n    holdout_fraction: 0.2\n",
            "study.yaml:10: field 'attacks.0.holdout_fraction': unknown key; attack "
            "'retain_relearn' takes: name, folds,",
        ),
        (  # the renamed key says what to write, on its own line
            "attacks:\n  - name: rtt\n    epochs: 2\n    loss: mcq\n",
            "study.yaml:11: field 'attacks.0.loss': 'loss' is now 'text_format' (the format "
            "of the training texts); write 'text_format: mcq'",
        ),
        (
            "attacks:\n  - {name: lora_rtt, loss: qa}\n",
            "study.yaml:9: field 'attacks.0.loss': 'loss' is now 'text_format'",
        ),
        (
            "attacks:\n  - {name: rtt, epochs: 0}\n",
            "study.yaml:9: field 'attacks.0.epochs': Input should be greater than or equal to 1",
        ),
        (
            "attacks: [{name: rtt}, {name: rtt, epochs: 2}]\n",
            "study.yaml:8: field 'attacks.1': attack 'rtt' is listed twice",
        ),
    ],
)
def test_attacks_section_errors_name_file_line_and_field(
    tmp_path: Path, cli, attacks: str, expect: str
) -> None:
    p = tmp_path / "study.yaml"
    p.write_text(
        "name: t\noutput_dir: out\nmodel: {tiny: {preset: micro}}\n"
        "datasets: [{name: w, world: {preset: tiny, seed: 0}}]\n"
        "methods: [{name: gd}]\nseeds: [0]\nselection: {retain_threshold: 0.5}\n" + attacks
    )
    r = cli("run", p, "--dry-run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert expect in r.stderr, r.stderr


def test_every_registered_attack_is_named_in_the_attack_commands_help(cli) -> None:
    r = cli("attack", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for name in ATTACKS:
        assert name in text, name
