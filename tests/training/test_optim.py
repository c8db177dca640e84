"""Schedules and Lion (rtteval.training.optim); precision-specific updates are in test_precision.py."""

import pytest
import torch

from rtteval.errors import ConfigError
from rtteval.training.config import TrainConfig
from rtteval.training.optim import Lion, lr_factor


def test_lr_schedule_warmup_and_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.0)
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.5)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ConfigError):
        lr_factor(20, 100, TrainConfig(schedule="bogus", warmup_steps=0))  # type: ignore[arg-type]


def test_lion_step_is_sign_update():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99))
    p.grad = torch.tensor([0.5, -0.1, 0.0])
    opt.step()
    assert p.detach().tolist() == pytest.approx([0.9, -1.9, 3.0])
