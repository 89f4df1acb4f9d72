"""Models: the Classifier adapter and the networks oodlab can train."""

from .adapter import AdapterError, Classifier
from .zoo import (ARCHS, CheckpointError, build, checkpoint_fingerprint, load_checkpoint, save_checkpoint,
                  state_fingerprint)

__all__ = ["AdapterError", "Classifier", "ARCHS", "CheckpointError", "build", "checkpoint_fingerprint",
           "load_checkpoint", "save_checkpoint", "state_fingerprint"]
