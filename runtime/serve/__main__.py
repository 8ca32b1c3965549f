"""``python -m cinemae.runtime.serve``: the same as ``cinemae-serve``."""

import sys

from .cli import main

sys.exit(main())
