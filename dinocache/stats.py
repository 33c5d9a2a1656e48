"""What is in a cache: counts per bucket, failures by reason, bytes, model and dtype."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .errors import untrusted
from .layout import Layout
from .location import CacheLocation
from .manifest import MANIFEST_NAME, load_samples, read_manifest, shard_path
from .statsfile import is_fresh, recorded_eps


def cache_stats(root: str | Path) -> dict:
    location = CacheLocation(root)
    shown, remote = location.name, location.is_remote
    root = location.local_view()
    manifest = read_manifest(root)
    table = load_samples(root, manifest)
    table.check_keys()  # a report about a cache must not vouch for one with hostile keys
    layout = Layout.from_record(manifest["storage"])
    failures = manifest["failures"]
    shard_bytes = sum(s["bytes"] for s in manifest["shards"])
    referenced = set(np.unique(table.columns["shard"]).tolist())
    return {
        "cache": shown,
        "images": len(table),
        "failed": len(failures),
        "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "failures": [{"key": f["key"], "reason": f["reason"], "detail": f.get("detail", "")} for f in failures],
        "buckets": _buckets(manifest["buckets"], table),
        "shards": len(manifest["shards"]),
        "unreferenced_shards": len(manifest["shards"]) - len(referenced),
        # one stat per shard (local caches): a report must not look healthy over missing files
        "damaged_shards": [] if remote else _damaged_shards(root, manifest["shards"]),
        "bytes_on_disk": shard_bytes + manifest["samples"]["bytes"] + (root / MANIFEST_NAME).stat().st_size,
        "model": manifest["model"]["id"],
        "revision": manifest["model"].get("revision"),
        "compute_dtype": manifest["model"].get("compute_dtype"),
        "storage_dtype": manifest["storage"]["dtype"],
        "registers_stored": layout.registers,
        "pool": layout.pool,
        "layers": list(layout.layers),
        "flip": layout.flip,
        "token_stats": layout.ln_stats,
        "format_version": manifest["format_version"],
        "resize": manifest["preprocessing"].get("resize"),
        "statistics": [_statistics_entry(e, manifest["samples"]["sha256"]) for e in manifest.get("statistics", [])],
        "aspect_histogram": _aspect_histogram(table),
        "runs": manifest.get("runs", []),
    }


def _buckets(buckets: list[dict], table) -> list[dict]:
    """Each bucket's sizes and how many of the cached images it holds."""
    total = len(table)
    per_bucket = Counter(np.asarray(table.columns["bucket"]).tolist())
    rows = []
    for b in buckets:
        count = per_bucket.get(b["index"], 0)
        stored = b.get("stored_grid", b["grid"])
        rows.append(
            {
                "name": b["name"],
                "input": f"{b['input_width']}x{b['input_height']}",
                "grid": f"{b['grid'][0]}x{b['grid'][1]}",
                "stored_grid": f"{stored[0]}x{stored[1]}",
                "images": count,
                "share": round(count / total, 4) if total else 0.0,
            }
        )
    return rows


def _statistics_entry(entry: dict, samples_sha256: str) -> dict:
    return {
        "flavour": entry.get("flavour"),
        "file": entry["file"],
        "samples": entry.get("samples"),
        "per_position": bool(entry.get("per_position")),
        "views": entry.get("views"),
        "eps": recorded_eps(entry),
        "stale": not is_fresh(entry, samples_sha256),
    }


def _aspect_histogram(table) -> list[dict]:
    """How many cached images have each source aspect ratio (width / height), in ASPECT_EDGES bins."""
    sizes = np.asarray(table.columns["source_size"], dtype=np.float64).reshape(-1, 2)
    aspects = sizes[:, 0] / np.maximum(sizes[:, 1], 1) if len(sizes) else np.zeros(0)
    hist, _ = np.histogram(aspects, bins=[0.0, *ASPECT_EDGES, np.inf])
    labels = (
        [f"< {ASPECT_EDGES[0]:.2f}"]
        + [f"{a:.2f}-{b:.2f}" for a, b in zip(ASPECT_EDGES, ASPECT_EDGES[1:])]
        + [f">= {ASPECT_EDGES[-1]:.2f}"]
    )
    return [{"aspect": label, "images": int(n)} for label, n in zip(labels, hist)]


def _damaged_shards(root: Path, shards: list[dict]) -> list[str]:
    """Shards that are missing or not the size the manifest records (`verify` says more)."""
    damaged = []
    for shard in shards:
        try:
            size = shard_path(root, shard["file"]).stat().st_size
        except OSError:
            size = None
        if size != shard["bytes"]:
            damaged.append(shard["file"])
    return damaged


# Source aspect ratio (width / height) bin edges: 1:4 ... 4:1.
ASPECT_EDGES = [0.25, 0.5, 0.667, 0.8, 0.95, 1.05, 1.25, 1.5, 2.0, 4.0]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def _stored(stats: dict) -> str:
    parts = [f"stored {stats['storage_dtype']}"]
    if stats["pool"] > 1:
        parts.append(f"pooled {stats['pool']}x{stats['pool']}")
    if stats["registers_stored"]:
        parts.append("registers kept")
    if stats["layers"]:
        parts.append("blocks " + ",".join(map(str, stats["layers"])))
    if stats["flip"]:
        parts.append("flipped view")
    return ", ".join(parts)


def format_stats(stats: dict, max_failures_listed: int = 20) -> str:
    lines = [
        f"cache      {stats['cache']}",
        f"model      {untrusted(stats['model'])}" + (f" @ {untrusted(stats['revision'])}" if stats["revision"] else ""),
        f"dtype      compute {stats['compute_dtype']}, {_stored(stats)}",
        f"images     {stats['images']} cached, {stats['failed']} failed",
        f"on disk    {human_bytes(stats['bytes_on_disk'])} in {stats['shards']} shard(s)",
    ]
    if stats["damaged_shards"]:
        lines.append(
            f"DAMAGED    {len(stats['damaged_shards'])} shard(s) missing or the wrong size (e.g. "
            f"{stats['damaged_shards'][0]}): `dinocache verify {stats['cache']}` says more, "
            "rerunning the same `dinocache extract` rebuilds them"
        )
    lines += _bucket_lines(stats)
    if stats["failures_by_reason"]:
        lines += _failure_lines(stats, max_failures_listed)
    if stats["images"]:
        lines += ["", "source aspect ratio (width / height):"]
        peak = max(h["images"] for h in stats["aspect_histogram"]) or 1
        for h in stats["aspect_histogram"]:
            lines.append(f"  {h['aspect']:>11} {h['images']:>8}  " + "#" * round(40 * h["images"] / peak))
    for entry in stats["statistics"]:
        kind, read_as = ("per position", 'normalize="position"') if entry["per_position"] else ("per channel", "")
        lines += [
            "",
            f"statistics {untrusted(entry['flavour'], 40)}, {kind}, {untrusted(str(entry['views']), 20)} views, over "
            f"{entry['samples']} samples, eps {entry['eps']:g} ({read_as or 'normalize=True'})"
            + (" -- STALE: the cache changed since; rerun `dinocache norm-stats`" if entry["stale"] else ""),
        ]
    if stats["runs"]:
        lines += _run_lines(stats["runs"])
    return "\n".join(lines)


def _bucket_lines(stats: dict) -> list[str]:
    pooled = stats["pool"] > 1
    lines = [
        "",
        f"{'bucket':>11} {'input':>11} {'grid':>7}"
        + (f" {'stored':>7}" if pooled else "")
        + f" {'images':>8} {'share':>7}",
    ]
    for b in stats["buckets"]:
        lines.append(
            f"{b['name']:>11} {b['input']:>11} {b['grid']:>7}"
            + (f" {b['stored_grid']:>7}" if pooled else "")
            + f" {b['images']:>8} {b['share'] * 100:>6.1f}%"
        )
    return lines


def _failure_lines(stats: dict, max_listed: int) -> list[str]:
    lines = ["", "failures by reason:"]
    lines += [f"  {untrusted(reason, 40):<14} {count}" for reason, count in stats["failures_by_reason"].items()]
    for f in stats["failures"][:max_listed]:
        lines.append(f"  - {untrusted(f['key'])}: {untrusted(f['reason'], 40)} ({untrusted(f['detail'])})")
    if len(stats["failures"]) > max_listed:
        lines.append(f"  ... {len(stats['failures']) - max_listed} more (see --json)")
    return lines


def _run_lines(runs: list[dict]) -> list[str]:
    lines = [
        "",
        f"{'run started':<26} {'rank':>5} {'images':>8} {'failed':>7} {'seconds':>9} {'img/s':>8}  device",
        "(img/s: images extracted / the run's wall time, model loading excluded)",
    ]
    for run in runs:
        rank = f"{run.get('rank', 0)}/{run.get('world_size', 1)}"
        note = f"  ({untrusted(run['interrupted'], 40)})" if run.get("interrupted") else ""
        started, device = untrusted(run.get("started", "?"), 40), untrusted(run.get("device", "?"), 40)
        lines.append(
            f"{started:<26} {rank:>5} {run.get('processed', 0):>8} {run.get('failed', 0):>7} "
            f"{run.get('seconds', 0):>9.1f} {run.get('images_per_second', 0):>8.1f}  {device}" + note
        )
    return lines
