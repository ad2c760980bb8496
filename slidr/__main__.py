"""``python -m slidr``: the same as the ``slidr`` command."""

import sys

from slidr.cli import main

sys.exit(main())
