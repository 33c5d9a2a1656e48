"""Prove a cache (or loose shards) complete and intact. Every problem is a record with a kind, the
file, the key when there is one, and a sentence; the CLI prints them or `--json`s them.

Each shard is read once, sequentially, in bounded chunks: the same pass computes its sha256,
and checks that every value is finite. Its header is checked against the layout (names, dtypes,
shapes) and, from format 2 on, its own metadata (settings, bucket, row records) against the
manifest. Without a manifest (a folder of shards, single files), each shard is checked on its
own, since shards are self-describing; what needs the manifest is listed as skipped.

One part, one module:
  paths      what each path is; `verify_paths`, the entry point
  bytescan   one pass over a shard: sha256 + the finite check from the layout's dtype table
  cache      one cache with its manifest (`verify_cache`), its extra files, unlisted shards
  listed     the shards a manifest lists: size, checksum, header, metadata
  table      the sample table
  source     --source: missing and changed images
  recompute  --recompute: features computed again and compared
  loose      shards without a manifest
  remote     a cache in object storage
  report     VerifyReport, Problem, and VerifyOptions (every choice of a run, in one object)
"""

from .bytescan import CHUNK, _finite, scan_shard
from .cache import _listed_shard_findings, verify_cache
from .loose import NEEDS_MANIFEST
from .paths import verify_paths
from .recompute import RECOMPUTE_MIN_COSINE
from .report import Problem, VerifyOptions, VerifyReport

__all__ = [
    "CHUNK",
    "NEEDS_MANIFEST",
    "RECOMPUTE_MIN_COSINE",
    "Problem",
    "VerifyOptions",
    "VerifyReport",
    "_finite",
    "_listed_shard_findings",
    "scan_shard",
    "verify_cache",
    "verify_paths",
]
