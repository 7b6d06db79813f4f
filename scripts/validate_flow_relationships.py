#!/usr/bin/env python3
"""The plan's entry point, kept for runbooks that name it: `flowfix validate`.

Extra arguments are passed on (e.g. --format junit). Same exit codes as flowfix validate.
"""

import sys

from flowfix.cli import app

if __name__ == "__main__":
    app(["validate", *sys.argv[1:]], prog_name="validate_flow_relationships.py")
