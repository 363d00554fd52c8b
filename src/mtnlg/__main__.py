"""``python -m mtnlg`` (what torchrun launches) is the CLI."""

import sys

from mtnlg.cli import main

sys.exit(main())
