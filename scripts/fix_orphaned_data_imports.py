#!/usr/bin/env python3
"""The plan's entry point, kept for runbooks that name it: `flowfix backfill --window 2h`.

Extra arguments are passed on (e.g. --dry-run). Same exit codes as flowfix backfill.
"""

import sys

from flowfix.cli import app

if __name__ == "__main__":
    app(["backfill", "--window", "2h", *sys.argv[1:]], prog_name="fix_orphaned_data_imports.py")
