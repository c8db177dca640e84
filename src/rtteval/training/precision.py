"""Training precisions: weight dtypes, casting, and the warning for updates that round away."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rtteval.errors import ConfigError
from rtteval.training.config import TrainConfig

#: Training precisions (docs/performance.md).  ``fp32``: fp32 weights (bf16
#: autocast on a GPU).  ``bf16``: bf16 weights whose updates are kept in fp32
#: (optimizer state and a Kahan residual), so none is lost to rounding.
#: ``bf16-pure`` / ``fp16``: the weights' dtype throughout, updates smaller
#: than half a rounding step vanish (``fp16`` is the paper's released RTT).
PRECISIONS: dict[str, tuple[torch.dtype, bool]] = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, True),
    "bf16-pure": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` is ``bf16`` on a GPU (keeps every update, half the weight memory) and ``fp32``
    elsewhere, so CPU numbers are those of fp32 training."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def check_precision(precision: str) -> None:
    """Refuse an unknown precision name before any work is done."""
    if precision != "auto" and precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; use auto, {', '.join(PRECISIONS)}", field="precision"
        )


def cast_for_precision(model: torch.nn.Module, precision: str) -> str:
    """Give ``model``'s floating-point parameters the precision's dtype, in place.

    Parameters only: buffers such as rotary frequencies stay as the model
    built them.  Returns the resolved precision.
    """
    params = list(model.parameters())
    mode = resolve_precision(precision, params[0].device)
    cast_parameters(model, [PRECISIONS[mode][0]] * len(params))
    return mode


def cast_parameters(model: torch.nn.Module, dtypes: Sequence[torch.dtype]) -> None:
    """Give each floating-point parameter its dtype from ``dtypes`` (in parameter order)."""
    for p, dtype in zip(model.parameters(), dtypes, strict=True):
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def rounding_step(magnitude: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s numbers at ``magnitude`` (one ulp)."""
    if magnitude <= 0:
        return float(torch.finfo(dtype).tiny)
    return float(torch.finfo(dtype).eps) * 2.0 ** math.floor(math.log2(magnitude))


def median_magnitude(tensors: Sequence[torch.Tensor], sample: int = 1 << 20) -> float:
    """Median |w| over ``tensors``, from an evenly strided sample of at most ``sample`` values."""
    total = sum(t.numel() for t in tensors)
    stride = max(1, total // sample)
    parts = [t.detach().reshape(-1)[::stride].float().abs() for t in tensors]
    return float(torch.cat(parts).median()) if parts else 0.0


def lost_update_warnings(
    tensors: Sequence[torch.Tensor], lrs: Sequence[float], precision: str
) -> list[str]:
    """A warning per lr below half the rounding step of weights at their median magnitude.

    Such an update rounds away on a typical weight (an update of about lr is
    what Lion makes exactly and Adam roughly), so training silently does
    less than its lr says.  The compensated ``bf16`` precision never warns.
    """
    dtype, compensated = PRECISIONS[precision]
    if compensated or not tensors:
        return []
    mag = median_magnitude(tensors)
    half = rounding_step(mag, dtype) / 2
    return [
        f"precision {precision}: lr {lr:g} is below half the rounding step ({half:.3g}) of "
        f"{str(dtype).removeprefix('torch.')} weights at their median magnitude {mag:.3g}, "
        "so most updates are lost; use precision bf16 or fp32"
        for lr in lrs
        if lr < half
    ]


class LostUpdateWarning(UserWarning):
    """An lr too small for the weights' dtype: most updates round away (see :func:`lost_update_warnings`)."""


def autocast_for(cfg: TrainConfig, device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast for ``fp32`` weights when ``cfg.autocast`` asks (``auto``: on a GPU); else off."""
    use = precision == "fp32" and (
        cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    )
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)
