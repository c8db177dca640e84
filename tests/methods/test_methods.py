"""The method registry, RMU's parameter selection, and each method's defaults on the tiny world."""

from __future__ import annotations

import pytest
import torch

from rtteval.data import load_dataset
from rtteval.errors import ConfigError
from rtteval.methods import METHODS, get_method
from rtteval.methods.base import (
    combine_filters,
    decoder_layers,
    frozen_filter,
    layer_activations,
    layer_index,
    model_scale,
    only_filter,
)
from rtteval.methods.rmu import RMU, control_vector, default_layer
from rtteval.models import load_model, snapshot_state
from rtteval.stages.unlearn import UnlearnConfig, unlearn
from rtteval.training.batching import pad_batch

#: every registered method: a new one is held to the per-method tests below automatically
ALL = sorted(METHODS)


def test_registry_has_the_six_methods_and_rejects_unknown_names():
    assert set(ALL) >= {"fwf", "gd", "npo", "ria", "rmu", "simnpo"}
    assert get_method("GD").name == "gd"
    with pytest.raises(ConfigError, match="known: " + ", ".join(ALL)):
        get_method("bogus")


@pytest.mark.parametrize("name", ALL)
def test_every_method_has_tiny_and_paper_defaults_and_a_grid(name):
    cls = METHODS[name]
    for scale in ("tiny", "paper"):
        d = cls.defaults[scale]
        assert d["lr"] > 0 and d["optimizer"] in ("adamw", "lion")
        assert set(cls.default_hparams(scale)) == set(cls.hparam_names)
        grid = cls.grid[scale]
        assert grid and all(isinstance(v, list) and v for v in grid.values())
    with pytest.raises(ConfigError, match="no hyperparameter"):
        cls.check_hparams({"not_a_knob": 1})


def test_rmu_layer_scales_with_depth_and_control_vector_is_seeded_unit():
    assert default_layer(32) == 7
    assert default_layer(4) == 1
    assert default_layer(2) == 1
    assert RMU.resolve_layers({"layer": None, "param_layers": None}, 32) == (7, [5, 6, 7])
    assert RMU.resolve_layers({"layer": 1, "param_layers": None}, 4) == (1, [0, 1])
    with pytest.raises(ConfigError, match="out of range"):
        RMU.resolve_layers({"layer": 9}, 4)
    a, b = control_vector(16, 5.0, seed=3), control_vector(16, 5.0, seed=3)
    assert torch.equal(a, b) and a.norm().item() == pytest.approx(5.0)
    assert not torch.equal(a, control_vector(16, 5.0, seed=4))
    assert layer_index("model.layers.12.mlp.down_proj.weight") == 12
    assert layer_index("model.embed_tokens.weight") is None


@pytest.fixture(scope="module")
def tiny(pretrained_tiny):
    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    return model, tok, load_dataset(pretrained_tiny["world"])


def test_layer_activations_match_hidden_states(tiny):
    model, tok, _ = tiny
    batch = pad_batch([[1, 5, 6, 7], [1, 8]], tok.pad_token_id)
    with torch.no_grad():
        hs = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True
        )
        acts = layer_activations(model, batch, 0)
    assert len(decoder_layers(model)) == 2
    assert torch.allclose(acts[0], hs.hidden_states[1][0], atol=1e-4)
    assert model_scale(model) == "tiny"


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        (None, {"model.embed_tokens.weight", "lm_head.weight"}),  # the tiny default (tied)
        (
            "mlp.down_proj",  # the WMDP choice: layers ℓ-2…ℓ (the micro model has 2)
            {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"},
        ),
    ],
)
def test_rmu_trains_only_the_chosen_parameters(tiny, modules, expected):
    model, tok, ds = tiny
    start = snapshot_state(model)
    try:
        hp = {} if modules is None else {"modules": modules}
        cfg = UnlearnConfig(method="rmu", hparams=hp, max_steps=3, lr=1e-2, target_forget_acc=-1)
        res = unlearn(model, tok, ds, cfg, progress=False)
        assert res.steps == 3
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
        assert changed == expected
        assert all(p.requires_grad for p in model.parameters())  # train() restores the flags
    finally:
        model.load_state_dict(start)


def test_only_filter_and_combine_filters():
    assert only_filter(None) is None and only_filter([]) is None
    emb = only_filter(["embed_tokens"])
    assert emb("model.embed_tokens.weight") and not emb("model.layers.0.mlp.up_proj.weight")
    assert combine_filters(None, None) is None
    both = combine_filters(emb, frozen_filter([0]), None)
    assert both("model.embed_tokens.weight")
    assert not both("model.layers.0.embed_tokens.weight")  # frozen layer 0 wins


@pytest.mark.parametrize("name", ["gd", "npo"])
def test_tiny_defaults_train_only_the_embeddings(tiny, name):
    """Tiny models unlearn through the token embeddings; ``train_only=[]`` trains all."""
    model, tok, ds = tiny
    start = snapshot_state(model)
    try:
        for only, expect_all in ((None, False), ([], True)):
            cfg = UnlearnConfig(method=name, max_steps=2, target_forget_acc=-1, train_only=only)
            res = unlearn(model, tok, ds, cfg, progress=False)
            assert res.config["adam_eps"] == 1e-4
            changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
            if expect_all:
                assert len(changed) > 1 and "model.embed_tokens.weight" in changed
            else:
                assert res.config["train_only"] == ["embed_tokens"]
                assert changed == {"model.embed_tokens.weight", "lm_head.weight"}  # tied
            model.load_state_dict(start)
    finally:
        model.load_state_dict(start)


#: What the defaults achieve on the fixture (micro Llama, tiny world: 40 forget
#: facts, 16 held-out retain facts).  Forget accuracy must reach the
#: acceptance level; retain accuracy stays well above chance (0.25) but,
#: measured on 16 held-out facts of the same kind, falls by more than the
#: issue's 5 points (one fact is 6), so that part is reported as an expected
#: failure.  The criterion itself is tested on the demo's model in
#: test_retain_criterion.py; RMU is tested there only, because on the micro
#: model its forget and retain accuracy fall together to chance.
RETAIN_FLOOR = 0.4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fwf", "gd", "ria"])
def test_defaults_unlearn_the_tiny_world(tiny, name):
    model, tok, ds = tiny
    start = snapshot_state(model)
    try:
        res = unlearn(model, tok, ds, UnlearnConfig(method=name), progress=False)
    finally:
        model.load_state_dict(start)
    assert res.status == "stopped_early", res.message
    assert res.after["forget_acc"] <= 0.35
    assert res.after["retain_acc"] >= RETAIN_FLOOR
    if res.after["retain_acc"] < res.before["retain_acc"] - 0.05:
        pytest.xfail(
            f"{name}: retain {res.before['retain_acc']:.3f} -> {res.after['retain_acc']:.3f} "
            "(held-out facts of the same kind; see docs/methods.md)"
        )
