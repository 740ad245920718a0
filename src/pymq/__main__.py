"""Run the pymq command line as ``python -m pymq``."""

import sys

from pymq.cli import main

if __name__ == "__main__":
    sys.exit(main())
