"""What verify found (problems, notes, skipped checks) and what it was asked to do (VerifyOptions)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class VerifyOptions:
    """Every choice of one verify run, passed as one object to each part."""

    check_values: bool = True  # the NaN/Inf scan (checksums always run)
    source: str | Path | None = None  # the images: find missing and changed ones
    recompute: int = 0  # re-extract this many random samples and compare
    seed: int = 0  # which samples --recompute takes
    device: str = "auto"  # for --recompute
    follow_symlinks: bool = False  # read --source links that lead outside it


@dataclass
class Problem:
    kind: str
    message: str
    path: str | None = None
    key: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class VerifyReport:
    paths: list[str] = field(default_factory=list)
    mode: str = "cache"  # "cache", or "shards" (no manifest)
    shards: int = 0
    samples: int = 0
    bytes_read: int = 0
    recomputed: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a fault
    skipped: list[str] = field(default_factory=list)  # checks that need what was not given

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str, path: str | None = None, key: str | None = None) -> None:
        self.problems.append(Problem(kind, message, path, key))

    def as_dict(self) -> dict:
        return {"ok": self.ok, **{k: v for k, v in asdict(self).items()}}

    # the CLI's text form lives here too, so both say the same
    def messages(self) -> list[str]:
        return [p.message for p in self.problems]
