import json

from rtteval.data import load_dataset
from rtteval.models import load_model
from rtteval.pretrain import scoring_for
from rtteval.scoring import evaluate_mcq


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
