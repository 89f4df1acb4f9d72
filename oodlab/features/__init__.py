"""Features: one data set seen through one model, ``(z, logits, labels)``, extracted once and cached.

:class:`Features` lives in memory; :class:`StoredFeatures` reads the same data from the sharded
on-disk cache one shard at a time. Detectors take either (``FeatureSource``).
"""

from .core import CHUNK_BYTES, Features, chunk_rows
from .extraction import SHARD_ITEMS, FeatureCache, UnreadableImagesError, autocast_dtype, extract
from .store import StoredFeatures

FeatureSource = Features | StoredFeatures

__all__ = ["Features", "StoredFeatures", "FeatureSource", "FeatureCache", "UnreadableImagesError", "extract",
           "autocast_dtype", "chunk_rows", "CHUNK_BYTES", "SHARD_ITEMS"]
