"""``python -m lightning_heavytail``: the ``lightning-heavytail`` command (see ``lightning_heavytail.cli``)."""

import sys

from lightning_heavytail.cli import main

if __name__ == "__main__":
    sys.exit(main())
