"""dinocache: DINOv3 features (CLS + variable-length patch tokens) cached per aspect bucket.

The reader API is imported on first use, so `import dinocache` (and the CLI's start) does not
pay for torch until something needs it.
"""

from ._version import __version__

__all__ = ["FeatureCache", "BucketBatchSampler", "collate_features", "__version__"]


def __getattr__(name: str):
    if name == "FeatureCache":
        from .reader import FeatureCache

        return FeatureCache
    if name in ("BucketBatchSampler", "collate_features"):
        from . import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module 'dinocache' has no attribute {name!r}")
