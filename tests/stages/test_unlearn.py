"""Unlearning runs, sweeps and selection, data sources, and the ``rtteval unlearn`` command."""

from __future__ import annotations

import json
import sys

import pytest

from rtteval.data import load_dataset
from rtteval.errors import ConfigError
from rtteval.methods import get_method
from rtteval.models import load_model, restore_state, snapshot_state
from rtteval.stages.unlearn import (
    UnlearnConfig,
    apply_point,
    expand_grid,
    forget_texts,
    paired_batches,
    resolve_config,
    retain_data,
    select_point,
    unlearn,
)


def row(forget, retain, status="stopped_early"):
    return {"forget_acc": forget, "retain_acc": retain, "status": status}


def test_select_point_lowest_forget_among_rows_that_keep_retain():
    rows = [row(0.30, 0.80), row(0.40, 0.96), row(0.35, 0.95), row(0.20, 0.99, "diverged")]
    # original retain 1.0, threshold 0.05: rows 1 and 2 qualify; row 2 forgets more
    assert select_point(rows, 1.0, 0.05) == 2
    assert select_point(rows, 1.0, 0.25) == 0  # looser threshold admits row 0
    assert select_point(rows, 1.0, 0.0) is None  # nothing qualifies; the diverged row never does
    assert select_point([row(0.3, 0.96), row(0.3, 0.98)], 1.0) == 1  # tie: higher retain
    assert select_point([row(0.3, 0.98), row(0.3, 0.98)], 1.0) == 0  # then the earlier point


def test_grid_expansion_and_points():
    pts = expand_grid({"lr": [1e-3, 1e-4], "retain_coef": [1.0]})
    assert pts == [{"lr": 1e-3, "retain_coef": 1.0}, {"lr": 1e-4, "retain_coef": 1.0}]
    cfg = apply_point(UnlearnConfig(method="gd"), pts[1])
    assert cfg.lr == 1e-4 and cfg.hparams == {"retain_coef": 1.0}
    with pytest.raises(ConfigError):
        expand_grid({"lr": []})


def test_resolve_config_fills_method_defaults_and_keeps_user_values():
    gd = get_method("gd")
    cfg = resolve_config(UnlearnConfig(method="gd", hparams={"retain_coef": 3.0}), gd, "tiny")
    assert cfg.lr == gd.defaults["tiny"]["lr"] and cfg.optimizer == "adamw"
    assert cfg.hparams == {"retain_coef": 3.0}
    assert resolve_config(UnlearnConfig(method="gd", lr=0.5), gd, "paper").lr == 0.5
    with pytest.raises(ConfigError, match="no hyperparameter"):
        resolve_config(UnlearnConfig(method="gd", hparams={"beta": 1.0}), gd, "tiny")


def test_world_data_sources(tiny_world):
    ds = load_dataset(tiny_world)
    texts, _ = forget_texts(ds, get_method("ria"))
    assert texts == [p.text for p in ds.passages("wrong_corpus")]
    texts, _ = forget_texts(ds, get_method("fwf"))
    assert texts == [p.text for p in ds.passages("fixed_wrong_corpus")]
    r = retain_data(ds)
    assert r.texts == [p.text for p in ds.corpus["retain_train"]]
    assert r.eval_questions == ds.retain["retain_eval"]  # held out from the retain loss


def test_paper_layout_needs_retain_data_and_never_evaluates_on_what_it_trains(tmp_path, tiny_world):
    import shutil

    paper = tmp_path / "paper"
    shutil.copytree(tiny_world, paper)
    for f in ("manifest.json", "retain_train.jsonl", "retain_eval.jsonl", "corpus_retain_train.jsonl",
              "corpus_retain_eval.jsonl"):  # fmt: skip
        (paper / f).unlink()
    ds = load_dataset(paper)
    with pytest.raises(ConfigError, match="--retain-data"):
        retain_data(ds)
    other = tmp_path / "mmlu"
    other.mkdir()
    for i, name in enumerate(("mmlu_a", "mmlu_b", "mmlu_c")):
        shutil.copy(tiny_world / f"split_{i}.jsonl", other / f"{name}.jsonl")
    rd = load_dataset(other)
    r = retain_data(ds, rd)
    trained = {q.question for q in rd.splits["mmlu_b"]}
    assert {q.question for q in r.eval_questions} == {
        q.question for n in ("mmlu_a", "mmlu_c") for q in rd.splits[n]
    }
    assert all(any(t in text for t in trained) for text in r.texts)


def test_paired_batches_cycle_the_shorter_retain_stream():
    forget = [[1, 2, 3]] * 10
    retain = [[4, 5]] * 3
    b = paired_batches(forget, retain, 2, 0, seed=0)
    e0, e1 = b(0), b(1)
    assert len(e0) == len(e1) == 5
    assert all(x["forget"]["input_ids"].shape[0] <= 2 for x in e0)
    assert all(x["retain"]["input_ids"][0, 0].item() == 4 for x in e0 + e1)


@pytest.fixture(scope="module")
def tiny(pretrained_tiny):
    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    return model, tok, load_dataset(pretrained_tiny["world"])


def test_unlearn_records_before_during_after(tiny):
    model, tok, ds = tiny
    start = snapshot_state(model)
    try:
        cfg = UnlearnConfig(method="gd", max_steps=4, eval_every_steps=2, target_forget_acc=None)
        res = unlearn(model, tok, ds, cfg, progress=False)
        assert res.status == "completed" and res.steps == 4
        assert [h["step"] for h in res.history] == [0, 2, 4]
        assert res.before["forget_acc"] >= 0.9
        assert set(res.after) == {"forget_acc", "retain_acc", "forget_acc_by_split"}
        assert set(res.after["forget_acc_by_split"]) == set(ds.splits)
        json.dumps(res.to_dict())
    finally:
        restore_state(model, start)


def run_cli(monkeypatch, capsys, *args):
    from rtteval.cli.main import main

    monkeypatch.setattr(sys, "argv", ["rtteval", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_unlearn_writes_model_and_metrics(pretrained_tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gd"
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "unlearn", "--model", str(pretrained_tiny["original"]),
        "--data", str(pretrained_tiny["world"]), "--method", "gd", "--out", str(out),
        "--max-steps", "3", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stdout
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["method"] == "gd" and summary["steps"] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_written"] and metrics["config"]["max_steps"] == 3
    assert {"before", "after", "history", "wall_time", "status", "config"} <= set(metrics)
    assert (out / "model.safetensors").exists()
    load_model(out, device="cpu")


def test_cli_train_only_and_adam_eps(pretrained_tiny, tmp_path, monkeypatch, capsys):
    """``--train-only all`` lifts the tiny default (embeddings only); ``--adam-eps`` sets ε."""
    out = tmp_path / "all"
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "unlearn", "--model", str(pretrained_tiny["original"]),
        "--data", str(pretrained_tiny["world"]), "--method", "gd", "--out", str(out),
        "--max-steps", "2", "--train-only", "all", "--adam-eps", "1e-6", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stdout
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    assert cfg["train_only"] == [] and cfg["adam_eps"] == 1e-6
    code, _, err = run_cli(
        monkeypatch, capsys, "unlearn", "--model", str(pretrained_tiny["original"]),
        "--data", str(pretrained_tiny["world"]), "--method", "gd", "--out", str(tmp_path / "x"),
        "--train-only", "embed_tokens,",
    )  # fmt: skip
    assert code == 2 and "--train-only" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "x").exists()


def test_cli_unknown_method_is_one_line_exit_2(pretrained_tiny, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(
        monkeypatch, capsys, "unlearn", "--model", str(pretrained_tiny["original"]),
        "--data", str(pretrained_tiny["world"]), "--method", "nope", "--out", str(tmp_path / "x"),
    )  # fmt: skip
    assert code == 2
    assert err.strip().count("\n") == 0 and "unknown unlearning method 'nope'" in err
    assert not (tmp_path / "x").exists()


def test_cli_diverged_run_writes_metrics_but_no_model(
    pretrained_tiny, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "bad"
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "unlearn", "--model", str(pretrained_tiny["original"]),
        "--data", str(pretrained_tiny["world"]), "--method", "gd", "--out", str(out),
        "--lr", "1e4", "--device", "cpu",
    )  # fmt: skip
    assert code == 1
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "diverged"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and not metrics["model_written"]
    assert not (out / "model.safetensors").exists()


def test_divergence_cap_is_relative_to_the_first_loss(tiny):
    """RMU's loss scale depends on the model: a large but steady loss is not divergence."""
    model, tok, ds = tiny
    start = snapshot_state(model)
    try:
        # a steering coefficient this large makes the first RMU loss ~1e6, far above any absolute cap
        big = UnlearnConfig(method="rmu", max_steps=3, eval_every_steps=3, lr=1e-5,
                            hparams={"steering_coef": 3000.0, "steering_rel": None})  # fmt: skip
        res = unlearn(model, tok, ds, big, progress=False)
        assert res.status != "diverged", res.message
        restore_state(model, start)
        capped = UnlearnConfig(**{**big.to_dict(), "max_loss": 1e4})
        res = unlearn(model, tok, ds, capped, progress=False)
        assert res.status == "diverged" and "max_loss 10000" in res.message
    finally:
        restore_state(model, start)
