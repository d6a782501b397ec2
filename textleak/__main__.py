"""``python -m textleak`` is the ``textleak`` command."""

import sys

from textleak.cli import main

sys.exit(main())
