"""Unlearning losses on tiny hand-computed tensors."""

import math

import pytest
import torch

from rtteval.methods.losses import (
    gradient_difference,
    masked_mse,
    npo_loss,
    relearn_with_retain,
    rmu_forget_loss,
    rmu_retain_loss,
    sequence_logprobs,
    simnpo_loss,
)


def test_sequence_logprobs_sums_labelled_tokens_and_counts_them():
    # vocab 2; uniform logits at every position -> log(1/2) per labelled token
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[0, 1, 0], [1, 1, -100]])
    logp, n = sequence_logprobs(logits, labels)
    # position 0's label is never predicted; row 1's last label is padding
    assert n.tolist() == [2, 1]
    assert logp.tolist() == pytest.approx([2 * math.log(0.5), math.log(0.5)])


def test_sequence_logprobs_uses_the_previous_positions_logits():
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # p(token 0 | pos 0) = 3/4
    logp, n = sequence_logprobs(logits, torch.tensor([[1, 0]]))
    assert n.item() == 1
    assert logp.item() == pytest.approx(math.log(0.75))


def test_gradient_difference_and_relearn_signs():
    f, r = torch.tensor(2.0), torch.tensor(3.0)
    assert gradient_difference(f, r, 0.5).item() == pytest.approx(-2.0 + 1.5)
    assert relearn_with_retain(f, r, 0.5).item() == pytest.approx(2.0 + 1.5)


def test_npo_loss_at_reference_and_its_limits():
    beta = 0.5
    same = torch.tensor([-3.0, -7.0])
    # log-ratio 0: -(2/β)·log σ(0) = (2/β)·log 2
    assert npo_loss(same, same, beta).item() == pytest.approx(2 / beta * math.log(2))
    # far below the reference the loss vanishes; far above it grows ~ 2·ratio
    assert npo_loss(same - 100, same, beta).item() == pytest.approx(0.0, abs=1e-6)
    assert npo_loss(same + 100, same, beta).item() == pytest.approx(200.0, rel=1e-3)
    # hand value: ratio 1, β 0.5 -> -(4)·log σ(-0.5)
    val = -4 * math.log(1 / (1 + math.exp(0.5)))
    assert npo_loss(torch.tensor([1.0]), torch.tensor([0.0]), beta).item() == pytest.approx(val)


def test_npo_gradient_pushes_likelihood_down():
    logp = torch.tensor([-2.0], requires_grad=True)
    npo_loss(logp, torch.tensor([-2.0]), 0.1).backward()
    assert logp.grad.item() > 0  # descending the loss lowers logp


def test_simnpo_loss_is_length_normalised_with_margin():
    beta, delta = 2.0, 0.5
    logp, n = torch.tensor([-6.0, -6.0]), torch.tensor([3, 6])
    expect = [
        -(2 / beta) * math.log(1 / (1 + math.exp(-(-beta * (-6.0 / k) - delta)))) for k in (3, 6)
    ]
    got = simnpo_loss(logp, n, beta, delta).item()
    assert got == pytest.approx(sum(expect) / 2)
    # reference-free: only the per-token average matters
    assert simnpo_loss(torch.tensor([-2.0]), torch.tensor([1]), beta, 0.0).item() == pytest.approx(
        simnpo_loss(torch.tensor([-8.0]), torch.tensor([4]), beta, 0.0).item()
    )


def test_masked_mse_ignores_padding_tokens():
    a = torch.tensor([[[1.0, 1.0], [100.0, -100.0]]])  # second token is padding
    b = torch.zeros(1, 1, 2)
    mask = torch.tensor([[1, 0]])
    assert masked_mse(a, b, mask).item() == pytest.approx(1.0)


def test_rmu_losses_on_hand_values():
    acts = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    cu = torch.tensor([3.0, 0.0])
    # real tokens: (3,4),(0,0),(1,0) vs (3,0): squared errors 16, 9, 4 over 3 tokens x 2 dims
    assert rmu_forget_loss(acts, cu, mask).item() == pytest.approx((16 + 9 + 4) / 6)
    frozen = acts.clone()
    frozen[0, 0] = torch.tensor([3.0, 2.0])
    frozen[1, 1] = 0.0  # differs only on padding: ignored
    assert rmu_retain_loss(acts, frozen, mask).item() == pytest.approx(4 / 6)
