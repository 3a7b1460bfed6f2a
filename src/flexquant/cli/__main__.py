"""``python -m flexquant.cli ...``: the `flexquant` command."""

import sys

from . import main

sys.exit(main())
