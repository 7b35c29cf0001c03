"""The one error type a user sees: a key path, a YAML line when known, and what to do.

Everything found wrong before a job starts is raised as ``UsageError``; the CLI prints
``str(err)`` and exits with code 2 (the convention of argparse, torchrun and sbatch for
bad input).
"""

from __future__ import annotations

EXIT_USAGE = 2


class FinalFailure(RuntimeError):
    """A failure that a restart would only repeat (the run's own stop policy, no
    checkpoint to resume from): the rank ends `stopped`, and train.max_restarts does not
    start the job again."""


class UsageError(Exception):
    """Bad input: a recipe, an override, a flag or a file the user named."""

    def __init__(self, message: str, *, key: str | None = None, line: int | None = None,
                 origin: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.line = line
        self.origin = origin  # "--set" when an override caused it, a file name otherwise

    def __str__(self) -> str:
        where = ""
        if self.key:
            where = self.key
            if self.line is not None:
                where += f" (line {self.line})"
            elif self.origin:
                where += f" ({self.origin})"
            where += ": "
        return printable(f"error: {where}{self.message}")


def printable(text: str) -> str:
    """``text`` as one line of visible characters: a line break, tab or escape sequence
    (from a key, a path or a library's message) written as Python writes it, ``\\n``,
    ``\\x1b``, so that it neither splits the error nor drives the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
