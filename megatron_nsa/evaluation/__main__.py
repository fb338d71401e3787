"""`python -m megatron_nsa.evaluation`: the same as `megatron-nsa evaluate`."""

import sys

from .evaluate import main

sys.exit(main())
