"""``python -m fadcore``: the ``fad`` command."""

import sys

from fadcore.cli import main

if __name__ == "__main__":
    sys.exit(main())
