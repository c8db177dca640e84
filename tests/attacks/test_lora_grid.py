"""LoRA-RTT's rank grid (a batch of adapters per rank) and its adapters saved in peft's format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rtteval.attacks import AttackContext
from rtteval.attacks.lora_rtt import (
    RANK_GRID_AXIS,
    LoraEnsemble,
    LoraRTT,
    LoraRTTSpec,
    adapter_saver,
    attach_lora,
)
from rtteval.data import load_dataset
from rtteval.models import load_model, snapshot_state
from rtteval.scoring import evaluate_mcq
from rtteval.stages.pretrain import scoring_for

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_rank_grid_batches_each_rank_and_saves_adapters_peft_loads(
    pretrained_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel

    ds = load_dataset(pretrained_tiny["world"])
    model, tok = load_model(pretrained_tiny["control"], device="cpu")  # V moves when it learns
    base = {k: v.clone() for k, v in snapshot_state(model).items()}
    batches: list[tuple[int, int]] = []  # (rank, adapters) of every LoraEnsemble built
    init = LoraEnsemble.__init__

    def spy(self, peft_model, lrs):
        init(self, peft_model, lrs)
        batches.append((self._stacked[0][0].shape[1], len(lrs)))

    monkeypatch.setattr(LoraEnsemble, "__init__", spy)
    common = dict(lrs=[1e-3, 3e-2], epochs=2, retain_eval="none", holdout_fraction=0.0)
    grid_cfg = LoraRTTSpec(ranks=[2, 4], **common).resolved(seed=0)
    assert grid_cfg["lora"]["ranks"] == [2, 4] and grid_cfg["lora"]["alphas"] == [4.0, 8.0]
    out = tmp_path / "adapters"
    ctx = AttackContext(model, tok, ds, folds=["split_0"])
    grid = LoraRTT().run({**grid_cfg, "save_adapters": str(out)}, ctx)
    assert batches == [(2, 2), (4, 2)]  # one batch of 2 adapters per rank, ranks in turn
    assert grid.config["grid_axis"] == RANK_GRID_AXIS and grid.lrs == [1.0, 2.0, 3.0, 4.0]
    assert grid.config["grid"] == [{"rank": r, "lr": lr} for r in (2, 4) for lr in (1e-3, 3e-2)]
    runs = grid.folds[0].runs
    assert [r.lr for r in runs] == [1.0, 2.0, 3.0, 4.0] and len(grid.grid()) == 8
    # rank 4 of the grid is the rank-4 attack alone
    alone = LoraRTT().run(LoraRTTSpec(rank=4, **common).resolved(seed=0), ctx)
    for g, a in zip(runs[2:], alone.folds[0].runs, strict=True):
        assert [e.v_correct for e in g.epochs] == [e.v_correct for e in a.epochs]
        assert [e.loss for e in g.epochs] == pytest.approx([e.loss for e in a.epochs], rel=1e-4)
    assert len({tuple(r.epochs[-1].v_correct) for r in runs}) > 1  # the grid points differ
    assert all(torch.equal(base[k], v) for k, v in snapshot_state(model).items())
    # every run's adapter, in peft's format: loaded on the base, V is what the record says
    scoring = scoring_for(ds)
    for rank, lr, run in ((2, 1e-3, runs[0]), (4, 3e-2, runs[3])):
        where = out / f"rank{rank}" / "split_0" / f"lr{lr:g}"
        assert (where / "adapter_config.json").is_file()
        fresh, _ = load_model(pretrained_tiny["control"], device="cpu")
        loaded = PeftModel.from_pretrained(fresh, where)
        assert loaded.peft_config["default"].r == rank
        got = evaluate_mcq(loaded, tok, ds.splits["split_0"], scoring).correct
        assert got == run.epochs[-1].v_correct


def test_a_batched_member_saves_as_the_adapter_it_is(pretrained_tiny, tmp_path: Path) -> None:
    """The saved adapter of ensemble member g gives member g's logits; the init is put back."""
    from peft import PeftModel

    from rtteval.attacks.folds import Fold

    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    ids = torch.tensor([tok.encode("Q: when was it? A: 1900.")])
    pm = attach_lora(model, LoraRTTSpec(rank=4).lora(), seed=0)
    ens = LoraEnsemble(pm, [1e-3, 1e-2])
    with torch.no_grad():
        for _a, b in ens._stacked:
            b[1].normal_(0, 0.05)  # member 1 moved, member 0 at the init (B = 0)
    want = ens.members[1](input_ids=ids).logits.detach()
    adapter_saver(pm, tmp_path)(Fold("split_0", [], "qa", []), 1e-2, 0, ens, 1)
    assert all(float(m.lora_B["default"].weight.abs().max()) == 0 for m in ens._layers)
    ens.close()
    pm.unload()
    fresh, _ = load_model(pretrained_tiny["original"], device="cpu")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "split_0" / "lr0.01")
    got = loaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(
        got, model(input_ids=ids).logits, atol=1e-3
    )


def test_lora_flags_from_the_cli(pretrained_tiny, tmp_path: Path, cli) -> None:
    """Ranks, alpha, dropout, target modules and eval_every_steps reach the records and OUT."""
    import json

    p = pretrained_tiny
    models = ["--model", p["original"], "--original", p["original"], "--data", p["world"]]
    out = tmp_path / "lora"
    r = cli(
        "attack", "--attack", "lora_rtt", *models, "--control", p["control"], "--out", out,
        "--ranks", "2,4", "--alpha", "8", "--dropout", "0.0", "--target-modules", "q_proj,v_proj",
        "--eval-every-steps", "2", "--lrs", "1e-2", "--epochs", "1", "--folds", "split_0",
        "--n-boot", "20",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    for a in res["attacks"]:
        assert a["config"]["lora"] == {"ranks": [2, 4], "alphas": [8.0, 8.0], "dropout": 0.0,
                                       "target_modules": ["q_proj", "v_proj"]}  # fmt: skip
        assert a["config"]["eval_every_steps"] == 2 and all(
            run["curve"] for f in a["folds"] for run in f["runs"]
        )
    (s,) = res["summary"]
    assert (
        s["budget"]["source"] == "steps" and "## Attack budget" in (out / "report.md").read_text()
    )
    assert (out / "fig_budget_lora_rtt.png").is_file()
    # the CLI runs a one-stage study: each arm's attack job keeps its adapters in its job dir
    saved = sorted(out.glob("jobs/attack/*/adapters/rank*/split_0/lr0.01/adapter_config.json"))
    assert len(saved) == 3 * 2  # three arms x two ranks
    for cfg in saved:
        assert json.loads(cfg.read_text())["r"] == int(cfg.parents[2].name.removeprefix("rank"))
    # an option of another attack, or a setting out of range: one line, exit 2, nothing written
    bad = tmp_path / "bad"
    for args, flag in (
        (["--attack", "rtt", "--rank", "4"], "--rank"),
        (["--attack", "icl", "--eval-every-steps", "3"], "--eval-every-steps"),
        (["--attack", "lora_rtt", "--rank", "2", "--ranks", "2,4"], "--ranks"),
        (["--attack", "lora_rtt", "--ranks", "0,2"], "--ranks"),
        (["--attack", "lora_rtt", "--ranks", "2,2"], "--ranks"),
        (["--attack", "lora_rtt", "--target-modules", ","], "--target-modules"),
        (["--attack", "lora_rtt", "--dropout", "1"], "--dropout"),
    ):
        r = cli("attack", *models, "--out", bad, *args)
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr, (args, r)
        assert not bad.exists()
