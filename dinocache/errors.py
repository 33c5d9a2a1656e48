"""Errors a user can act on.

Every problem caused by input (a config, a folder, a model id, a cache) is raised as a
DinocacheError carrying what went wrong and how to fix it. The CLI prints these without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DinocacheError(Exception):
    """A user-facing error: `message` says what is wrong, `hint` says how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class ConfigError(DinocacheError):
    """The bucket config or an option is invalid."""


class ModelLoadError(DinocacheError):
    """The model could not be found, downloaded or understood."""


class CacheError(DinocacheError):
    """A cache directory is missing, locked, unreadable or incompatible."""


class DecodeError(Exception):
    """One image could not be used; `reason` is a short stable code counted by `stats`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


SHOWN_CHARS = 200


def untrusted(text: object, limit: int = SHOWN_CHARS) -> str:
    """Text from a file dinocache does not control (a lock, a manifest field, a failure detail)
    as it may be shown to a user: control and other non-printable characters escaped (no raw
    terminal escapes), cut to `limit` characters with a note of how much was left out."""
    text = str(text)
    cut = len(text) - limit
    shown = text[:limit] if cut > 0 else text
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)
    return shown + (f"... ({cut} more characters)" if cut > 0 else "")
