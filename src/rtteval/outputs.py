"""Output directories: never delete a user's files, never leave half an output.

Every directory rtteval writes (``--out`` of ``world``, ``pretrain``,
``finetune``, ``unlearn``, ``attack``, ``demo`` and a study's
``output_dir``) goes through this module, so the rules live in one place:

* a non-empty directory is written into only with ``overwrite`` (a
  resumable output of the same kind, e.g. an interrupted ``attack``, is
  resumed without it);
* even then rtteval deletes only the entries that its marker file
  (:data:`MARKER`, written into every output) lists as its own; a user's
  ``thesis.tex`` beside them is never touched, and a user's file with the
  same name as one rtteval wants to write is an error, not a casualty;
* a one-shot output is assembled in a temporary sibling directory and
  renamed into place, so a crash leaves either the old output or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rtteval.errors import UserError

MARKER = ".rtteval-output.json"
"""Written into every output directory: its kind and the entries rtteval wrote."""

OVERWRITE_HELP = "write into a non-empty --out, replacing only files rtteval wrote there"
"""The ``--overwrite`` help text, shared by every command that has the option."""

_STUDY_FILES = ("runs.db",)
"""A study directory from before the marker existed is recognised by these."""


def _abs(out: str | Path) -> Path:
    """Absolute, without resolving symlinks of the last part: ``.`` becomes the CWD's path."""
    return Path(os.path.abspath(os.path.expanduser(str(out))))


def read_marker(out: Path) -> dict[str, Any] | None:
    """The marker of ``out``, or None when absent or unreadable (then nothing is rtteval's)."""
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("entries", []), list):
        return None
    return data


def _owned(marker: dict[str, Any] | None) -> list[str]:
    """Entry names the marker claims, keeping only plain names (no ``..``, no separators)."""
    if marker is None:
        return []
    names = marker.get("entries") or []
    return [
        n for n in names
        if isinstance(n, str) and n not in ("", ".", "..", MARKER) and "/" not in n and "\0" not in n
    ]  # fmt: skip


def _write_marker(out: Path, kind: str, entries: Iterable[str]) -> None:
    from rtteval.atomic import write_json_atomic

    write_json_atomic(out / MARKER, {"kind": kind, "entries": sorted(set(entries))})


def check_writable(out: str | Path, *, field: str | None = None, file: str | None = None) -> None:
    """Raise unless ``out`` is, or can become, a directory rtteval can write into.

    Probes by creating (and removing) a temporary directory in the nearest
    existing ancestor, so that root, read-only mounts and ``/proc`` are all
    judged by what the filesystem actually allows.
    """
    p = _abs(out)

    def fail(msg: str) -> UserError:
        if file is not None:
            return UserError(f"{msg}: {p}", file=file, field=field)
        return UserError(msg, file=p, field=field)

    if p.exists() and not p.is_dir():
        raise fail("exists and is not a directory")
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise fail(f"cannot create a directory under the file {anc}")
    try:
        probe = tempfile.mkdtemp(prefix=".rtteval-probe-", dir=anc)
    except OSError as e:
        raise fail(
            f"not writable: cannot create a directory in {anc} ({e.strerror or e})"
        ) from None
    os.rmdir(probe)


def check_output(out: str | Path, *, overwrite: bool, kind: str, resumable: bool = False) -> bool:
    """Raise unless ``kind`` may be written to ``out``; True when it resumes an earlier one.

    Call it before any expensive work, so that a refused ``--out`` costs
    nothing; the writers below call it again before touching the directory.
    """
    p = _abs(out)
    check_writable(p)
    if not p.exists() or not any(p.iterdir()):
        return False
    marker = read_marker(p)
    if marker is None and kind == "study" and any((p / f).exists() for f in _STUDY_FILES):
        marker = {"kind": "study", "entries": []}
    if resumable and not overwrite and marker is not None and marker.get("kind") == kind:
        return True
    if overwrite:
        return False
    if kind == "study":  # `run` and `demo` have no --overwrite: a study dir only resumes
        what = f"an rtteval {marker.get('kind')} output" if marker else "something else"
        raise UserError(
            f"directory is not empty and holds {what}, not an rtteval study; choose a new or "
            "empty one",
            file=p,
        )
    if marker is not None:
        raise UserError(
            f"directory is not empty: it holds an earlier rtteval {marker.get('kind', 'output')} "
            "output; pass --overwrite to replace it",
            file=p,
        )
    raise UserError(
        "directory is not empty and rtteval did not write it; choose a new or empty one, or "
        "pass --overwrite (only rtteval's own files are ever replaced)",
        file=p,
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _holds_cwd(p: Path) -> bool:
    """Whether ``p`` is the CWD or above it: such a directory is never renamed away."""
    cwd, real = Path(os.getcwd()).resolve(), p.resolve()
    return cwd == real or real in cwd.parents


def _commit(stage: Path, out: Path, kind: str) -> None:
    """Move a finished ``stage`` into ``out``, replacing only what rtteval wrote there."""
    new = sorted(n for n in os.listdir(stage) if n != MARKER)
    _write_marker(stage, kind, new)
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700
    with contextlib.suppress(FileNotFoundError, OSError):
        if not out.exists() or (out.is_dir() and not any(out.iterdir()) and not _holds_cwd(out)):
            os.replace(stage, out)  # rename(2) replaces an empty directory atomically
            return
    old = _owned(read_marker(out))
    present = set(os.listdir(out)) - {MARKER}
    foreign = present - set(old)
    clash = sorted(foreign & set(new))
    if clash:
        raise UserError(
            f"would replace {clash[0]!r}, which rtteval did not write; move it away first",
            file=out,
        )
    if not foreign and not _holds_cwd(out):
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "d")
        os.replace(stage, out)
        shutil.rmtree(trash, ignore_errors=True)
        return
    # a user's files live beside rtteval's (or it is the CWD): swap entry by entry
    for name in old:
        _remove(out / name)
    (out / MARKER).unlink(missing_ok=True)
    for name in new:
        os.replace(stage / name, out / name)
    os.replace(stage / MARKER, out / MARKER)
    shutil.rmtree(stage, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_output(out: str | Path, *, overwrite: bool, kind: str) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; on success it becomes ``out``.

    On an exception the stage is removed and ``out`` is untouched.
    """
    p = _abs(out)
    check_output(p, overwrite=overwrite, kind=kind)
    p.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{p.name}.tmp-", dir=p.parent))
    try:
        yield stage
        check_output(p, overwrite=overwrite, kind=kind)  # it may have changed meanwhile
        _commit(stage, p, kind)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class ResumableOutput:
    """An output written piece by piece and resumed after an interruption (``attack``, studies).

    Each piece is written atomically by its writer; this class guards the
    directory and records in the marker which entries are rtteval's.  The
    directory is created by :meth:`open`, which a command calls only when it
    has a finished piece to write, so a command that fails before that
    leaves no directory behind.
    """

    def __init__(
        self, out: str | Path, *, overwrite: bool, kind: str, names: Iterable[str] = ()
    ) -> None:
        self.path = _abs(out)
        self.kind = kind
        self.resumed = check_output(self.path, overwrite=overwrite, kind=kind, resumable=True)
        marker = read_marker(self.path) if self.path.exists() else None
        self._entries: set[str] = set(_owned(marker))
        if self.path.is_dir():
            foreign = set(os.listdir(self.path)) - self._entries - {MARKER}
            clash = sorted(foreign & set(names)) if not self.resumed else []
            if clash:
                raise UserError(
                    f"would replace {clash[0]!r}, which rtteval did not write; move it away first",
                    file=self.path,
                )
        # with overwrite, the earlier output goes when the first new piece is ready, not before
        self._stale = overwrite and marker is not None

    @property
    def entries(self) -> frozenset[str]:
        """The top-level entries the marker says rtteval wrote."""
        return frozenset(self._entries)

    def open(self) -> Path:
        """Create the directory (if needed) and its marker; returns its absolute path."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self._stale:
            for name in self._entries:
                _remove(self.path / name)
            self._entries, self._stale = set(), False
        _write_marker(self.path, self.kind, self._entries)
        return self.path

    def add(self, *names: str) -> None:
        """Record top-level entries as rtteval's (so ``--overwrite`` may later replace them)."""
        self._entries.update(n for n in names if n != MARKER)
        _write_marker(self.path, self.kind, self._entries)
