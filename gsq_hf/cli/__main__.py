"""``python -m gsq_hf.cli``: the ``gsq-hf`` command (also under torchrun / accelerate launch)."""

import sys

from . import main

sys.exit(main())
