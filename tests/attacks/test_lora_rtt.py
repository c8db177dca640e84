"""LoRA-RTT: RTT's protocol with peft adapters on a frozen base (CLI, YAML, peft round trip)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rtteval.attacks.folds import build_folds
from rtteval.attacks.lora_rtt import LoraEnsemble, LoraRTTSpec, attach_lora, is_lora_param
from rtteval.attacks.relearn import relearn
from rtteval.attacks.rtt import RTTConfig
from rtteval.data import load_dataset
from rtteval.errors import ConfigError
from rtteval.models import load_model, snapshot_state
from rtteval.stages.pretrain import scoring_for
from tests.attacks._nontraining import micro_study
from tests.attacks.test_rtt import _crude_unlearn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_settings_resolve_with_lora_defaults_and_literature_preset() -> None:
    d = LoraRTTSpec().resolved(seed=3)
    assert d["lora"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
    assert d["seed"] == 3 and d["lrs"] == [1e-3, 3e-3, 1e-2]
    p = LoraRTTSpec(paper=True).resolved(seed=0)
    assert p["lora"]["rank"] == 128 and p["lora"]["alpha"] == 256.0 and 2e-4 in p["lrs"]
    assert p["optimizer"] == "adamw" and p["text_format"] == "mcq" and p["holdout_fraction"] == 0.0
    assert LoraRTTSpec(rank=16, lrs=[5e-4]).resolved(seed=0)["lora"]["alpha"] == 32.0
    assert "batched" not in d and LoraRTTSpec(batched=False).resolved(seed=0)["batched"] is False


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")  # peft on load
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_adapter_trains_alone_saves_and_loads_with_peft(pretrained_tiny, tmp_path: Path) -> None:
    from peft import PeftModel

    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    before = {k: v.clone() for k, v in snapshot_state(model).items()}
    ids = torch.tensor([tok.encode("Q: when was it? A: 1900.")])
    base_logits = model(input_ids=ids).logits.detach()
    lora = LoraRTTSpec(rank=4).lora()
    pm = attach_lora(model, lora, seed=0)
    trained = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trained and all(is_lora_param(n) for n in trained)
    assert any(".mlp." in n for n in trained) and any(".self_attn." in n for n in trained)
    assert torch.allclose(pm(input_ids=ids).logits, base_logits)  # B = 0: starts as the base
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapted = pm(input_ids=ids).logits.detach()
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    pm.save_pretrained(tmp_path / "adapter")
    pm.unload()
    assert not [n for n, _ in model.named_modules() if "lora" in n]
    assert all(torch.equal(before[k], v) for k, v in snapshot_state(model).items())
    fresh, _ = load_model(pretrained_tiny["original"], device="cpu")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert torch.allclose(loaded(input_ids=ids).logits, adapted, atol=1e-5)
    with pytest.raises(ConfigError, match="target_modules"):
        attach_lora(model, {**lora, "target_modules": ["no_such_proj"]})
    # an adapter on a non-linear layer cannot be stacked: lr by lr, or an error when insisted on
    emb = attach_lora(model, {**lora, "target_modules": ["embed_tokens"]})
    assert "embed_tokens" in (LoraEnsemble.unsupported(emb) or "")
    assert LoraEnsemble.factory(None)(emb, [1e-3, 1e-2]) is None
    with pytest.raises(ConfigError, match="batched"):
        LoraEnsemble.factory(True)(emb, [1e-3, 1e-2])
    emb.unload()


def test_batched_adapters_equal_each_adapter_trained_alone_through_peft(pretrained_tiny) -> None:
    """One frozen base + G stacked adapters (bmm) gives each lr's peft run: losses and V, AdamW."""
    ds = load_dataset(pretrained_tiny["world"])
    model, tok = load_model(pretrained_tiny["control"], device="cpu")  # V moves when it learns
    before = {k: v.clone() for k, v in snapshot_state(model).items()}
    cfg = RTTConfig(lrs=[1e-3, 1e-2, 3e-2], epochs=3, folds=["split_0"], retain_eval="none")
    fs = build_folds(ds, cfg.validate())
    pm = attach_lora(model, LoraRTTSpec(rank=4, dropout=0.0).lora(), seed=0)
    made: list[LoraEnsemble] = []

    def make(m, lrs):
        made.append(LoraEnsemble(m, lrs))
        return made[-1]

    out = {}
    for batched in (True, False):
        out[batched] = relearn(
            pm, tok, ds, fs, cfg, scoring_for(ds), config={}, trainable=is_lora_param,
            make_ensemble=make, batched=batched,
        )  # fmt: skip
    assert len(made) == 1  # the batched run used the ensemble, the other trained lr by lr
    together, alone = out[True].folds[0].runs, out[False].folds[0].runs
    assert [r.lr for r in together] == [r.lr for r in alone] == cfg.lrs
    for a, b in zip(together, alone, strict=True):
        assert a.status == b.status == "completed" and len(a.epochs) == len(b.epochs) == 3
        for ea, eb in zip(a.epochs, b.epochs, strict=True):
            assert ea.loss == pytest.approx(eb.loss, rel=1e-4)
            assert ea.v_correct == eb.v_correct
    assert alone[1].epochs[-1].loss < alone[1].epochs[0].loss  # it trained: the loss fell
    assert len({tuple(r.epochs[-1].v_correct) for r in alone}) > 1  # V moved differently per lr
    pm.unload()
    assert all(torch.equal(before[k], v) for k, v in snapshot_state(model).items())


def test_lora_rtt_from_the_cli_recovers_the_unlearned_not_the_control(
    pretrained_tiny, tmp_path: Path, cli
) -> None:
    world = load_dataset(pretrained_tiny["world"])
    unlearned = tmp_path / "unlearned"
    _crude_unlearn(pretrained_tiny["original"], unlearned, world)
    model, _ = load_model(unlearned, device="cpu")
    base = {k: v.clone() for k, v in snapshot_state(model).items()}
    del model
    out = tmp_path / "lora"
    r = cli(
        "attack", "--attack", "lora_rtt", "--model", unlearned,
        "--original", pretrained_tiny["original"], "--control", pretrained_tiny["control"],
        "--data", pretrained_tiny["world"], "--out", out, "--epochs", "3", "--n-boot", "50",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    (s,) = res["summary"]
    assert s["attack"] == "lora_rtt" and s["dataset"].endswith("[lora_rtt]")
    assert s["unlearned"] <= 0.5 and s["unlearned_rtt"] >= s["unlearned"] + 0.15  # it relearned
    assert s["control_rtt"] <= 0.5  # V cannot be guessed from T, adapters or not
    assert s["unlearned_rtt"] > s["control_rtt"]  # above the floor: recovered, not taught
    for a in res["attacks"]:
        assert a["config"]["lora"]["rank"] == 8 and all(
            f["provenance"]["checked"] for f in a["folds"]
        )
    # the attacked model on disk is untouched (the base is frozen and the adapters removed)
    model, _ = load_model(unlearned, device="cpu")
    assert all(torch.equal(base[k], v) for k, v in snapshot_state(model).items())


def test_lora_rtt_runs_from_a_study_yaml(tmp_path: Path, cli, pretrained_tiny) -> None:
    out = tmp_path / "out"
    p = tmp_path / "lora.yaml"
    p.write_text(
        micro_study(
            "lora",
            out,
            pretrained_tiny,
            [
                "{name: lora_rtt, rank: 4, lrs: [1.0e-2], epochs: 1, folds: [split_0], eval_every_steps: 1}"
            ],
            plots=False,
        )
    )
    res = cli("run", p)
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert {(e["dataset"], e["attack"]) for e in results["summary"]} == {
        ("w [lora_rtt]", "lora_rtt")
    }
    assert {a["role"] for a in results["attacks"]} == {"original", "control", "unlearned"}
    assert all(a["config"]["lora"]["rank"] == 4 for a in results["attacks"])
    # V every step: each run's budget curve, and the summary's budget read from it
    assert all(r["curve"] for a in results["attacks"] for f in a["folds"] for r in f["runs"])
    assert results["summary"][0]["budget"]["source"] == "steps"
    # every attack job saved its adapter in peft's format
    saved = sorted(out.glob("jobs/attack/*/adapters/split_0/lr0.01/adapter_config.json"))
    assert len(saved) == 3 and json.loads(saved[0].read_text())["r"] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(p.read_text().replace("rank: 4", "rank: 0"))
    r = cli("run", bad)
    assert r.returncode == 2 and "attacks.0.rank" in r.stderr and "Traceback" not in r.stderr
