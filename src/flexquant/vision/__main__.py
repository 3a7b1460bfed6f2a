"""``python -m flexquant.vision quantize ...``: the vision CLI without the top-level `flexquant` command."""

import sys

from .cli import main

sys.exit(main())
