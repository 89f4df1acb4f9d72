"""Benchmarks: run detectors over a suite and report the results."""

from .api import parse_detectors, run_bench
from .runner import BenchContext, detector_key, load_rows, load_scores, run_detectors

__all__ = ["BenchContext", "detector_key", "load_rows", "load_scores", "parse_detectors", "run_bench", "run_detectors"]
