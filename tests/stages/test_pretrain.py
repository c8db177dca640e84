import json

from rtteval.data import load_dataset
from rtteval.models import load_model
from rtteval.scoring import evaluate_mcq
from rtteval.stages.pretrain import scoring_for


def test_pretraining_learns_facts_and_control_does_not(pretrained_tiny):
    ds = load_dataset(pretrained_tiny["world"])
    sc = scoring_for(ds)
    assert sc.mode == "likelihood"
    results = {}
    for kind in ("original", "control"):
        model, tok = load_model(pretrained_tiny[kind], device="cpu")
        results[kind] = {
            "forget": evaluate_mcq(model, tok, ds.questions(), sc).accuracy,
            "retain": evaluate_mcq(model, tok, ds.retain["retain_eval"], sc).accuracy,
        }
        meta = json.loads((pretrained_tiny[kind] / "pretrain.json").read_text())
        assert meta["kind"] == kind
    # chance is 25%: the original knows its facts, the control knows only the retain facts
    assert results["original"]["forget"] >= 0.9
    assert results["original"]["retain"] >= 0.9
    assert results["control"]["retain"] >= 0.9
    assert results["control"]["forget"] <= 0.5
    # both share one vocabulary, so RTT on either sees the same tokens
    _, tok_o = load_model(pretrained_tiny["original"], device="cpu")
    _, tok_c = load_model(pretrained_tiny["control"], device="cpu")
    assert tok_o.get_vocab() == tok_c.get_vocab()


def test_bios_variants_rotate_one_per_epoch():
    from rtteval.data.types import Passage
    from rtteval.stages.pretrain import _epoch_texts

    ps = [Passage(text=f"bio {v}", extra={"variant": v}) for v in range(3)] + [Passage(text="qa")]
    assert _epoch_texts(ps, 0) == ["bio 0", "qa"]
    assert _epoch_texts(ps, 4) == ["bio 1", "qa"]


def test_control_excludes_forget_corpus(tiny_world):
    from rtteval.stages.pretrain import pretraining_passages

    ds = load_dataset(tiny_world)
    full = pretraining_passages(ds, exclude_forget=False)
    ctrl = pretraining_passages(ds, exclude_forget=True)
    forget_splits = set(ds.splits)
    assert all(p.split not in forget_splits for p in ctrl)
    assert {p.split for p in full} >= forget_splits
    assert len(full) - len(ctrl) == sum(len(ds.corpus[s]) for s in forget_splits)


def test_finetune_regime_teaches_forget_facts_to_the_control(pretrained_tiny, tmp_path):
    from rtteval.stages.finetune import FinetuneConfig, finetune_forget_facts

    m = finetune_forget_facts(
        pretrained_tiny["control"],
        pretrained_tiny["world"],
        tmp_path / "ft",
        FinetuneConfig(lr=3e-3, max_epochs=60),
        progress=False,
    )
    assert m["before"]["forget_acc"] <= 0.5
    assert m["forget_acc"] >= 0.8, m
    assert m["retain_acc"] >= 0.8, m


def test_finetune_cli(pretrained_tiny, tmp_path, cli):
    r = cli(
        "finetune",
        "--model",
        pretrained_tiny["control"],
        "--world",
        pretrained_tiny["world"],
        "--out",
        tmp_path / "ft",
        "--lr",
        "3e-3",
        "--max-epochs",
        "40",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["kind"] == "finetuned" and out["forget_acc"] > out["before"]["forget_acc"] + 0.3
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def test_pretraining_anneals_after_the_constant_phase(pretrained_tiny, tiny_world, tmp_path):
    """Warmup-stable-decay: ``anneal_epochs`` more epochs after the target, lr decaying to 0."""
    from rtteval.stages.pretrain import PretrainConfig, pretrain

    meta = json.loads((pretrained_tiny["original"] / "pretrain.json").read_text())
    per_epoch = meta["train"]["steps"] // meta["train"]["epochs_run"]
    assert meta["config"]["anneal_epochs"] == 10
    assert meta["anneal"]["steps"] == 10 * per_epoch
    assert meta["anneal"]["after"]["forget_acc"] == meta["forget_acc"] >= 0.9

    cfg = dict(model_preset="micro", batch_size=32, max_epochs=1, target_accuracy=1.0)
    plain = pretrain(
        tiny_world, tmp_path / "a", PretrainConfig(**cfg, anneal_epochs=0), progress=False
    )
    assert "anneal" not in plain
    annealed = pretrain(
        tiny_world, tmp_path / "b", PretrainConfig(**cfg, anneal_epochs=2), progress=False
    )
    assert annealed["anneal"]["steps"] == 2 * annealed["train"]["steps"]
    assert annealed["anneal"]["status"] == "completed"
