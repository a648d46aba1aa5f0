"""``python -m lightning_heavytail``: the ``lightning-heavytail`` command (see :mod:`lightning_heavytail.cli`)."""

import sys

from lightning_heavytail.cli import main

if __name__ == "__main__":
    sys.exit(main())
