"""Which images a run extracts, and how: a pure function of the scanned sources and the cache's
committed state. It returns a value; the caller applies it to the state (no hidden writes)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .buckets import Bucket
from .distributed import RankContext
from .errors import DecodeError
from .placement import BY_CROPS, Crop, place, probe_source
from .sources import Source, SourceFile


@dataclass(frozen=True, slots=True)
class WorkItem:  # one per image to extract: kept small, a run may have millions
    key: str
    path: str
    bucket: int
    box: tuple[int, int, int, int]
    source_bytes: int
    source_mtime_ns: int
    source_size: tuple[int, int]
    placement: int
    locator: object = None  # where its bytes are in `path`, for its source (SourceFile.locator)
    hinted: bool = False  # placed from a list file's width/height, not from the header
    source: Source | None = None  # the source that reads it: `item.source.read(item, limit)`

    @property
    def size(self) -> int:  # what a source reads an item by: path, locator and size
        return self.source_bytes

    def record(self, sha256: str) -> dict:
        return {
            "key": self.key,
            "bucket": self.bucket,
            "source_bytes": self.source_bytes,
            "source_mtime_ns": self.source_mtime_ns,
            "source_sha256": sha256,
            "source_size": list(self.source_size),
            "box": list(self.box),
            "placement": self.placement,
        }


@dataclass
class Selection:
    work: list[WorkItem] = field(default_factory=list)  # sorted by bucket, then key
    cached: int = 0  # unchanged and cached: skipped
    failed_before: int = 0  # unchanged and recorded as failed in an earlier run: not retried
    refreshed: list[dict] = field(default_factory=list)  # --rehash: same content, new size/mtime stamp
    failures: list[tuple[SourceFile, str, str]] = field(default_factory=list)  # (source, reason, detail)


def _placement_changed(cached: dict, crop: Crop | None) -> bool:
    """A cached sample is recomputed when the crops file now says something else for it."""
    if crop is not None:
        return (
            cached.get("placement") != BY_CROPS or cached["bucket"] != crop.bucket or tuple(cached["box"]) != crop.box
        )
    return cached.get("placement") == BY_CROPS  # was placed by a crops file that no longer lists it


# Failures whose cause may have gone without the file changing: a raised --max-pixels, a new
# --follow-symlinks, a permission fixed, a crops file edited. They are tried again every run
# (a header read at most); the others only once their file changes, or with --retry-failed.
RETRIED_EVERY_RUN = frozenset(
    {"too_large", "outside_source", "unreadable", "missing", "unreachable", "crop_outside", "lost", "size_hint"}
)


def select_work(
    sources: list[SourceFile],
    buckets: list[Bucket],
    state,
    resize: str,
    max_pixels: int,
    rehash: bool = False,
    crops: dict[str, Crop] | None = None,
    ctx: RankContext | None = None,
    retry_failed: bool = False,
) -> Selection:
    """Skip what is cached and unchanged (key + size + mtime; a same-size file with a new mtime,
    or with `rehash` every file, by content hash),
    recompute what changed, retry failures only when their file changed, and place the rest.
    Under a process group each rank reads 1/world of the headers and all receive every result."""
    crops = crops or {}
    out = Selection()
    todo = [item for src in sources if (item := _triage(src, state, crops.get(src.key), rehash, retry_failed, out))]
    for src, (status, a, b) in zip(todo, _probe_all(todo, max_pixels, ctx or RankContext())):
        if status != "ok":
            out.failures.append((src, a, b))
            continue
        try:
            where = place(a, b, buckets, resize, crops.get(src.key))
        except Exception as exc:  # DecodeError: a crop box that does not fit this image
            out.failures.append((src, getattr(exc, "reason", "crop_outside"), getattr(exc, "detail", str(exc))))
            continue
        out.work.append(
            WorkItem(
                src.key,
                src.path,
                where.bucket,
                where.box,
                src.size,
                src.mtime_ns,
                (a, b),
                where.placement,
                src.locator,
                src.hint is not None,
                src.source,
            )
        )
    out.work.sort(key=lambda w: (w.bucket, w.key))
    return out


def _triage(src: SourceFile, state, crop: Crop | None, rehash: bool, retry_failed: bool, out: Selection):
    """`src` (or the record to probe in its place) when it needs a header read and placement;
    None when it is counted in `out` as cached, failed before, or refreshed."""
    cached = state.cached(src.key)
    previous = cached or state.failures.get(src.key)
    same_stamp = (
        previous is not None
        and previous.get("source_bytes") == src.size
        and _as_int(previous.get("source_mtime_ns")) == src.mtime_ns
    )
    retry = not cached and previous is not None and (retry_failed or previous.get("reason") in RETRIED_EVERY_RUN)
    if retry and previous.get("reason") == "size_hint":
        src = replace(src, hint=None)  # the list's width/height were wrong: read the header this time
    if cached and _placement_changed(cached, crop):
        return src
    if same_stamp and not (rehash and cached) and not retry:
        if cached:
            out.cached += 1
        else:
            out.failed_before += 1
        return None
    if cached and same_content(src, cached.get("source_bytes"), cached["source_sha256"]):
        # Same content, new stamp (a copied folder, a touched file): keep the row, refresh the stamp.
        out.refreshed.append({**cached, "source_bytes": src.size, "source_mtime_ns": src.mtime_ns})
        out.cached += 1
        return None
    return src


def _probe_all(todo: list[SourceFile], max_pixels: int, ctx: RankContext) -> list[tuple]:
    """Every item's probe result, in order; under a process group each rank probes 1/world."""
    if not ctx.group:
        return [probe_source(src, max_pixels) for src in todo]
    mine = {i: probe_source(todo[i], max_pixels) for i in range(ctx.rank, len(todo), ctx.world_size)}
    probes: dict[int, tuple] = {}
    for part in ctx.all_gather(mine):
        probes.update(part)
    return [probes[i] for i in range(len(todo))]


def _as_int(value) -> int | None:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return value


def same_content(src: SourceFile, recorded_bytes: int | None, recorded_sha256: str) -> bool:
    """Whether `src` still holds the bytes a record was made from. Only a file of the recorded
    size is read and hashed (one read, far cheaper than a forward); another size cannot match."""
    return recorded_bytes == src.size and source_sha256_or_none(src) == recorded_sha256


def source_sha256_or_none(src: SourceFile) -> str | None:
    try:
        return src.source.sha256(src)
    except DecodeError:
        return None
