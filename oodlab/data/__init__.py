"""Data: sources of images and the named benchmark suites built from them."""

from .base import ArrayDataset, DataMissingError, ImageSet, batches
from .suites import SUITES, Suite, load_suite, register_suite
from .preprocessing import IMAGENET, Preprocessing

__all__ = ["IMAGENET", "Preprocessing", "ArrayDataset", "DataMissingError", "ImageSet", "batches", "SUITES", "Suite", "load_suite", "register_suite"]
