"""The quantization attack: deterministic, on the grid, keeps the ceiling, adds nothing to the floor."""

from __future__ import annotations

from pathlib import Path

import torch

from rtteval.attacks import AttackContext, get_attack
from rtteval.attacks.quantize import (
    QuantizeConfig,
    dequantize,
    quantize_model,
    quantized_layers,
    resolve_group,
    rtn,
)
from rtteval.attacks.records import ModelAttack
from rtteval.data import load_dataset
from rtteval.models import load_model, restore_state, snapshot_state
from tests.attacks._nontraining import assert_at_chance, cli_args, run_cli, run_yaml


def test_rtn_is_deterministic_and_the_dequantized_weights_lie_on_the_grid(pretrained_tiny) -> None:
    model, _ = load_model(pretrained_tiny["original"], device="cpu")
    snap = snapshot_state(model)
    layers = quantized_layers(model)
    assert layers and not [n for n, _ in layers if n.endswith("lm_head")]
    group = resolve_group(model, None)
    assert group == min(128, min(m.in_features for _, m in layers) // 4) < layers[0][1].in_features
    for scheme, bits, g in [("int8-channel", 8, None), ("int4-group", 4, group)]:
        qmax = 2 ** (bits - 1) - 1
        orig = {n: m.weight.detach().clone() for n, m in layers}
        quantize_model(model, scheme, group)
        first = {n: m.weight.detach().clone() for n, m in layers}
        restore_state(model, snap)
        quantize_model(model, scheme, group)
        for n, m in layers:
            w = m.weight.detach()
            assert torch.equal(w, first[n])  # deterministic
            q, scale = rtn(orig[n], bits, g)
            # exactly on the grid: integers within range, times one scale per channel / group
            assert torch.equal(q, q.round()) and q.abs().max() <= qmax
            assert scale.shape[:2] == (w.shape[0], 1 if g is None else -(-w.shape[1] // g))
            assert torch.equal(w, dequantize(q, scale, w.shape[1]))
            # each group's largest weight takes the top level, so the grid is not trivially coarse
            assert torch.equal(q.abs().amax(dim=-1), torch.full_like(q[..., 0], qmax))
            assert not torch.equal(w, orig[n])  # it did round something
        restore_state(model, snap)


def test_int8_keeps_the_originals_knowledge(pretrained_tiny) -> None:
    """The ceiling: quantization alone must not destroy what the model knows."""
    ds = load_dataset(pretrained_tiny["world"])
    model, tok = load_model(pretrained_tiny["original"], device="cpu")
    a = get_attack("quantize").run(
        QuantizeConfig(schemes=["int8-channel", "int8-group"]).resolved(0),
        AttackContext(model, tok, ds),
    )
    n = len(a.question_ids)
    before = [c for f in a.folds for c in f.before.v_correct]
    assert sum(before) / n >= 0.9  # the original knows the facts
    for lr in a.lrs:
        after = a.correct_at(lr, 1)
        flipped = sum(int(b) != int(x) for b, x in zip(before, after, strict=True))
        assert flipped <= max(1, n // 20), (lr, flipped, n)  # at most 5% of answers change


def test_quantize_from_the_cli(tmp_path: Path, cli, pretrained_tiny) -> None:
    bad = cli(*cli_args(pretrained_tiny, "quantize"), "--schemes", "int3-channel", "--out", "x")
    assert bad.returncode == 2 and "--schemes: " in bad.stderr, bad.stderr
    res = run_cli(
        cli, tmp_path, pretrained_tiny, "quantize", "--schemes", "int8-channel,int4-group",
        "--group-size", "32",
    )  # fmt: skip
    (s,) = res["summary"]
    assert (s["dataset"], s["attack"], s["method"]) == ("tiny [quantize]", "quantize", "never")
    for a in res["attacks"]:
        c = a["config"]
        assert c["schemes"] == ["int8-channel", "int4-group"] and c["group_size"] == 32
        assert c["lrs"] == [1.0, 2.0] and c["grid_axis"] == "schemes"
        (f,) = a["folds"]
        assert f["provenance"]["n_train_texts"] == 0 and f["provenance"]["checked"]
    # the unlearned model here is the never-learned control: quantizing it adds no V fact
    (unl,) = [ModelAttack.from_dict(a) for a in res["attacks"] if a["role"] == "unlearned"]
    assert_at_chance(unl)


def test_quantize_from_yaml_is_its_own_row_and_the_control_stays_at_chance(
    tmp_path: Path, cli, pretrained_tiny
) -> None:
    res = run_yaml(
        cli,
        tmp_path,
        pretrained_tiny,
        "q",
        "{name: quantize, schemes: [int4-group], group_size: 8}",
    )
    assert {(e["dataset"], e["attack"]) for e in res["summary"]} == {("w [quantize]", "quantize")}
    assert {a["role"] for a in res["attacks"]} == {"original", "control", "unlearned"}
    assert "`quantize`: quantization" in res["_report_md"]
    by_role = {a["role"]: ModelAttack.from_dict(a) for a in res["attacks"]}
    assert by_role["original"].config["group_size"] == 8
    assert_at_chance(by_role["control"])
