"""``python -m lib_merge``: the command line (see lib_merge/cli/main.py)."""

import sys

from .cli import main

sys.exit(main())
