import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rtteval.errors import UserError
from rtteval.models import (
    build_tiny_model,
    load_model,
    n_params,
    restore_state,
    save_model,
    snapshot_state,
)
from rtteval.scoring import ScoringConfig, evaluate_mcq
from tests.helpers import toy_tokenizer_and_model


def test_tiny_preset_size():
    _, _, tok, _ = toy_tokenizer_and_model()
    m = build_tiny_model("tiny-1m", tok)
    # hidden 128, 4 layers, MLP 512, tied embeddings: ~0.8M + embeddings
    assert 0.7e6 < n_params(m) < 1.5e6
    assert m.config.tie_word_embeddings


def test_seeded_init_is_deterministic():
    _, _, tok, _ = toy_tokenizer_and_model()
    a, b = build_tiny_model("micro", tok, seed=1), build_tiny_model("micro", tok, seed=1)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_save_load_round_trip(tmp_path):
    qs, _, tok, model = toy_tokenizer_and_model()
    out = save_model(model, tok, tmp_path / "m")
    assert (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".m.tmp-*"))
    # loads with plain transformers too
    AutoTokenizer.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out)
    m2, tok2 = load_model(out, device="cpu")
    assert tok2.encode(qs[0].question) == tok.encode(qs[0].question)
    cfg = ScoringConfig(mode="likelihood")
    torch.testing.assert_close(
        evaluate_mcq(m2, tok2, qs, cfg).scores, evaluate_mcq(model, tok, qs, cfg).scores
    )


def test_load_model_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)


def test_snapshot_restore():
    _, _, _, model = toy_tokenizer_and_model()
    state = snapshot_state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    restore_state(model, state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
