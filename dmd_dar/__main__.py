"""``python -m dmd_dar <command> ...``: the same entry point as the ``dmd-dar`` console script."""

import sys

from dmd_dar.cli import main

if __name__ == "__main__":
    sys.exit(main())
