"""Every on-disk name and the format version, in one place (docs/FORMAT.md is their spec).
Nothing here imports anything, so the CLI can start without torch."""

FORMAT_NAME = "dinocache"
FORMAT_VERSION = 3  # bumped whenever a reader of the previous version would misread a cache
READABLE_VERSIONS = (1, 2, 3)

DEFAULT_OUT = "dinocache_out"
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
INDEX_DIR = "index"  # the sample table (dinocache/index.py), one file per committed generation
RANK_DIR = "ranks"  # reports of the ranks of a multi-process run, until merged into the manifest
STATS_DIR = "stats"  # dataset statistics written by `dinocache norm-stats`
NORM_FILE = "final_norm.safetensors"  # the final LayerNorm's weight and bias (flavours)
SHARD_SUFFIX = ".safetensors"
LOCK_NAME = ".lock"

DEFAULT_MODEL = "facebook/dinov3-vitl16-pretrain-lvd1689m"
