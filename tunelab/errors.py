"""User-facing errors.

A `TunelabError` is a problem the user caused and can fix (a config key, a data line, a
path, an option). The CLI prints its message, with no traceback, and exits with code 2.
Anything else is a bug in tunelab and keeps its traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """A problem the user can fix. `str(err)` is the whole message: what, where, how to fix."""

    exit_code = 2


class ConfigError(TunelabError):
    """One or more problems in a run config; each problem is one line of the message."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        header = f"{source}: " if source else ""
        count = len(problems)
        lines = [f"{header}{count} problem{'s' if count != 1 else ''} in the config:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class DataError(TunelabError):
    """A problem in the user's data, located as `file:line` when the source has lines."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


class TrainingInterrupted(TunelabError):
    """Training stopped on request (Ctrl-C / SIGTERM) after writing a checkpoint to resume from.

    Not a mistake, but the run is unfinished: the CLI prints the message (where the
    checkpoint is, the command that resumes) and exits with the shell's code for the
    signal, 128 + signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
