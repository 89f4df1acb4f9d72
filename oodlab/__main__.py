"""``python -m oodlab`` (and ``torchrun -m oodlab``) runs the ``oodlab`` command."""

import sys

from .cli import main

sys.exit(main())
