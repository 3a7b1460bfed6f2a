"""`python -m flexquant` (and `torchrun ... -m flexquant`): the command line."""

import sys

from .cli import main

sys.exit(main())
