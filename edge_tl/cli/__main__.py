"""``python -m edge_tl.cli`` (also under ``torchrun -m edge_tl.cli``)."""

import sys

from edge_tl.cli import main

sys.exit(main())
