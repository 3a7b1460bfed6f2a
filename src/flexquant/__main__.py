"""`python -m flexquant ...` (and `torchrun ... -m flexquant quantize ...`): the command line."""

from .cli import main

raise SystemExit(main())
