"""``python -m fomoe``: the fomoe command line (see fomoe.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
