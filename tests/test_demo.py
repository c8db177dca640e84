"""`rtteval demo` end to end, shrunk: the demo's own config with a micro model and the tiny world."""

import json

from rtteval.demo import demo_config_path, run_demo

SMALL = [
    "seeds=[0]",  # the demo's second seed doubles the cost and adds no path to test
    "model.tiny.preset=micro",
    "model.tiny.pretrain.batch_size=32",
    "model.tiny.pretrain.max_epochs=150",
    "datasets.0.world.preset=tiny",
    "attacks.0.lrs=[0.001,0.003]",
    "attacks.0.epochs=3",
    "executor.kind=sequential",
    # RMU's tiny default steers through the token embeddings, which does not
    # unlearn a 2-layer micro model (forget 0.75, docs/methods.md); here it
    # trains the WMDP down-projections instead
    "methods=[{name: gd}, {name: ria}, {name: rmu, fixed: {modules: mlp.down_proj, alpha: 1.0}}]",
]


def test_demo_config_is_packaged_and_shipped():
    path = demo_config_path()
    assert path.is_file()
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert shipped.read_text() == path.read_text()


def test_demo_runs_end_to_end_and_resumes(tmp_path, cli):
    out = tmp_path / "demo"
    results = run_demo(out, overrides=SMALL, say=lambda s: None)
    by_method = {e["method"]: e for e in results["summary"]}
    assert set(by_method) == {"gd", "ria", "rmu"}
    for e in by_method.values():
        assert e["chance"] == 0.25
        assert e["original"] >= 0.9  # the pretrained model knows its facts
        assert e["unlearned"] <= 0.4  # unlearning took them below the original by far
        assert e["control_rtt"] <= 0.5  # V cannot be guessed from T
        assert e["recovery"] is not None
    for name in (
        "results.json",
        "results.csv",
        "report.md",
        "fig_recovery.png",
        "fig_rtt_curves.png",
    ):
        assert (out / name).is_file(), name
    # a second run finds every job done and recomputes nothing
    again = run_demo(out, overrides=SMALL, say=lambda s: None)
    assert [e["unlearned_rtt"] for e in again["summary"]] == [
        e["unlearned_rtt"] for e in results["summary"]
    ]
    assert json.loads((out / "results.json").read_text())["summary"]
    # the CLI on the finished study: both tables, nothing recomputed
    r = cli("demo", "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    assert "control (never learned)" in r.stdout and "unlearned: rmu" in r.stdout
    assert "RTT summary" in r.stdout
