"""dinocache: DINOv3 features (CLS + variable-length patch tokens) cached per aspect bucket."""

__version__ = "0.1.0"

from .reader import BucketBatchSampler, FeatureCache, collate_features  # noqa: E402

__all__ = ["FeatureCache", "BucketBatchSampler", "collate_features", "__version__"]
