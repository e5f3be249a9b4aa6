#!/usr/bin/env python3
"""Back up existing assets (issue 4): the same program as `versionstore initial-backup`.

Usage and options: docs/initial-backup.md, or `scripts/initial_backup.py --help`.
"""

import sys

from versionstore.backup_client import main

if __name__ == "__main__":
    sys.exit(main())
