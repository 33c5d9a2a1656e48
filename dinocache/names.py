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

# The names dinocache gives the files it creates in those folders, and the patterns that match
# exactly those names (manifest.OWNED: nothing else is ever deleted). Ids are random hex.


def shard_name(bucket_index: int, bucket_name: str, run_id: str, seq: int) -> str:
    """shards/b003-832x1216-1a2b3c4d-00007.safetensors: bucket, writer run, sequence."""
    return f"{SHARD_DIR}/b{bucket_index:03d}-{bucket_name}-{run_id}-{seq:05d}{SHARD_SUFFIX}"


def table_name(uid: str) -> str:
    """index/samples-0123456789ab.safetensors: one committed generation of the sample table."""
    return f"{INDEX_DIR}/samples-{uid}.safetensors"


def rank_report_name(rank: int, run_id: str) -> str:
    """ranks/rank-00003-1a2b3c4d.json (the folder is added by the writer)."""
    return f"rank-{rank:05d}-{run_id}.json"


def lease_name(uid: str) -> str:
    """ranks/lease-0123456789ab.json: a writer of many, while it writes (lock.WriterLease)."""
    return f"{RANK_DIR}/lease-{uid}.json"


def statistics_name(flavour: str, kind: str, uid: str) -> str:
    """stats/normed-channel-0123456789ab.safetensors: FLAVOUR-KIND-ID."""
    return f"{STATS_DIR}/{flavour}-{kind}-{uid}.safetensors"


REPORT_PATTERN = r"rank-\d{5,}-[0-9a-f]{8}\.json"  # the reports among ranks/ (the rest: leases)
LEASE_PATTERN = r"lease-[0-9a-f]{12}\.json"
OWNED_PATTERNS = {
    SHARD_DIR: r"b\d{3,}-\d+x\d+-[0-9a-f]{8}-\d{5,}\.safetensors",
    INDEX_DIR: r"samples-[0-9a-f]{12}\.safetensors",
    RANK_DIR: f"{REPORT_PATTERN}|{LEASE_PATTERN}",
    STATS_DIR: r"[a-z_]+-(channel|position)-[0-9a-f]{12}\.safetensors",
}

DEFAULT_MODEL = "facebook/dinov3-vitl16-pretrain-lvd1689m"
