"""``key=value`` settings on every single-stage command, checked by the stage's own config.

Each stage's settings are declared once, in its config model (pydantic, or a
dataclass read through pydantic); a command's hand-written flags are sugar
for some of those fields, and ``key=value`` arguments set any of them, with
the dotted keys and YAML values of ``rtteval run CONFIG key=value``
(:func:`rtteval.config.study.parse_overrides`).  A typo'd key or a value of
the wrong type is one line naming the argument and the key, exit 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from pydantic import BaseModel, TypeAdapter, ValidationError

from rtteval.errors import ConfigError

SETTINGS_HELP = (
    "KEY=VALUE settings of the stage's config, as in `rtteval run CONFIG key=value` "
    "(dotted keys, YAML values, checked like a study config's), e.g. {example}; "
    "they win over the options"
)


def settings_argument(example: str) -> Any:
    """The trailing ``KEY=VALUE...`` argument of a command (its help names one example)."""
    return Annotated[
        list[str] | None,
        typer.Argument(help=SETTINGS_HELP.format(example=example), metavar="[KEY=VALUE]..."),
    ]


def setting_keys(items: Sequence[str] | None) -> list[str]:
    """The top-level keys ``items`` set (``rtteval world`` passes only those on)."""
    from rtteval.config.study import parse_overrides

    return [str(loc[0]) for loc, _v, _t in parse_overrides(list(items or []))]


def _keys(model: Any) -> list[str]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return [f.name for f in dataclasses.fields(model)]


def apply_settings(
    model: Any,
    given: dict[str, Any],
    items: Sequence[str] | None,
    *,
    exclude: Sequence[str] = (),
    flags: dict[str, str] | None = None,
) -> Any:
    """``given`` (from the options) with ``items`` applied, validated by ``model`` (an instance).

    ``exclude`` are fields a command sets itself (and a ``key=value`` may not);
    ``flags`` names the option of a field set from one, for the error line.
    """
    from rtteval.config.study import apply_overrides, parse_overrides

    parsed = parse_overrides(list(items or []))
    allowed = [k for k in _keys(model) if k not in exclude]
    for loc, _value, text in parsed:
        if str(loc[0]) not in allowed:
            raise ConfigError(
                f"unknown key; expected one of: {', '.join(allowed)}",
                file=f"setting {text!r}",
                field=".".join(map(str, loc)),
            )
    data = apply_overrides(given, parsed)
    try:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate(data)
        return _dataclass(model, data)
    except _FieldError as e:
        err, loc = e.err, (e.key, *e.err["loc"])
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        located = (err.get("ctx") or {}).get("error")
        loc += tuple(getattr(located, "loc", ()))  # a model validator naming its field
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("value_error", "missing"):
        shown = repr(err["input"])
        msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    dotted = ".".join(map(str, loc)) or None
    for ploc, _v, text in parsed:
        if loc[: len(ploc)] == ploc or ploc[: len(loc)] == loc:
            raise ConfigError(msg, file=f"setting {text!r}", field=dotted)
    flag = (flags or {}).get(str(loc[0])) if loc else None
    raise ConfigError(msg, file=flag or "--" + str(loc[0]).replace("_", "-") if loc else None)


class _FieldError(Exception):
    def __init__(self, key: str, err: Any) -> None:
        super().__init__(key)
        self.key, self.err = key, err


def _dataclass(model: Any, data: dict[str, Any]) -> Any:
    """A dataclass from ``data``, each field checked strictly against its declared type."""
    import typing

    hints = typing.get_type_hints(model, include_extras=True)  # with the declared ranges
    out = {}
    for k, v in data.items():
        try:
            out[k] = TypeAdapter(hints[k]).validate_python(v, strict=True)
        except ValidationError as e:
            raise _FieldError(k, e.errors()[0]) from None
    return model(**out)
