"""`python -m qthink` is the `qthink` command."""

import sys

from qthink.cli import main

sys.exit(main())
