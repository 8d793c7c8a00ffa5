"""`python -m runtime`: the command line lives in runtime/cli/main.py."""

import sys

from runtime.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
