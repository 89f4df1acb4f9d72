"""Deployment: calibrated OOD flags with a guaranteed false-alarm rate, saved as one folder, exported as one model."""

from .conformal import FlagRateReport, benjamini_hochberg, flag_rate_test, p_values
from .core import Guard, GuardError, GuardOutput

__all__ = ["Guard", "GuardError", "GuardOutput", "FlagRateReport", "benjamini_hochberg", "flag_rate_test", "p_values"]
