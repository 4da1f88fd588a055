"""``python -m lorasae.cli``: the `lorasae` command (as ``accelerate launch -m lorasae.cli`` needs)."""

import sys

from lorasae.cli import main

sys.exit(main())
