"""User-facing errors.

Every mistake a user can make (a malformed data file, a bad config, a missing
path) is raised as :class:`UserError`.  The CLI catches exactly this class and
prints one line to stderr with exit status 2; anything else is a bug in
rtteval and is allowed to surface as a traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, reported as ``file:line: field: message``."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self.render())

    def render(self) -> str:
        """One line: ``path:line: field 'x': message`` (parts omitted when unknown)."""
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
            where += ": "
        what = f"field '{self.field}': " if self.field else ""
        # one line whatever the message holds (a library's multi-line error text included)
        return " ".join(f"{where}{what}{self.message}".split())


class DataError(UserError):
    """A dataset file is malformed."""


class ConfigError(UserError):
    """A configuration value or file is invalid."""


class DataWarning(UserWarning):
    """Data that loads but deserves a look (the CLI prints it as one ``rtteval: warning:`` line)."""
