"""Numeric CLI options that declare their valid range.

Every numeric option of every command is parsed by a :class:`Number`, so a
zero batch size, a negative learning rate, ``inf`` or ``abc`` is refused by
the option parser itself: before any dataset or model is loaded, as one
line naming the option (exit 2).  Click's own ``IntRange``/``FloatRange``
would let ``nan`` and ``inf`` through, hence this small type.  The test
sweep (tests/cli/test_cli_validation.py) reads these declarations from the app,
so a new numeric option is covered as soon as it exists.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any

from rtteval.errors import UserError


@dataclass(frozen=True)
class Number:
    """A finite int or float with optional bounds; used as ``typer.Option(parser=...)``."""

    kind: type = float
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    @property
    def __name__(self) -> str:  # typer names the metavar after the parser
        return "integer" if self.kind is int else "float"

    def describe(self) -> str:
        """``an integer >= 1``, ``a finite number > 0 and <= 1`` ..."""
        parts = [f"{op} {b:g}" for op, b in
                 ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if b is not None]  # fmt: skip
        what = "an integer" if self.kind is int else "a finite number"
        return what + (" " + " and ".join(parts) if parts else "")

    def accepts(self, value: float) -> bool:
        """Whether ``value`` is in range (bounds only; the type is checked when parsing)."""
        return (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def __call__(self, value: Any) -> int | float:
        text = str(value).strip()
        try:
            v: int | float = int(text) if self.kind is int else float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {self.describe()}") from None
        if not self.accepts(v):
            raise ValueError(f"{text} is not {self.describe()}")
        return v


# The ranges the commands share (one place, so `attack` and `unlearn` agree).
POSITIVE = Number(float, gt=0)
NON_NEGATIVE = Number(float, ge=0)
FRACTION = Number(float, ge=0, le=1)
ACCURACY = Number(float, gt=0, le=1)
COUNT = Number(int, ge=1)
COUNT0 = Number(int, ge=0)
SEED = Number(int, ge=0)


def check_device_option(device: str) -> None:
    """``--device`` names a device this machine has (before any data or model is loaded)."""
    from rtteval.models.loading import check_device

    try:
        check_device(device)
    except UserError as e:
        raise UserError(e.message, file="--device") from None


def show_ranges(app: Any) -> None:
    """Append every numeric option's declared range to its ``--help`` text.

    The range is declared once, in the option's ``parser``; this makes the
    help say it too (``--batch-size  <int>  ... (an integer >= 1)``).
    """
    apps = [app, *(g.typer_instance for g in app.registered_groups)]
    for a in apps:
        for c in a.registered_commands:
            # string annotations (PEP 563) are re-evaluated into new objects on every
            # read, so store the evaluated, amended ones back for typer to read
            hints = typing.get_type_hints(c.callback, include_extras=True)
            for name, ann in hints.items():
                for meta in getattr(ann, "__metadata__", ()):
                    spec = getattr(meta, "parser", None)
                    if isinstance(spec, Number) and spec.describe() not in (meta.help or ""):
                        meta.help = f"{meta.help + ' ' if meta.help else ''}({spec.describe()})"
                        c.callback.__annotations__[name] = ann
