"""``python -m lightning_memopt.cli``: the ``lightning-memopt`` command without its console script."""

import sys

from lightning_memopt.cli import main

sys.exit(main())
