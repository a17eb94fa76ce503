"""`python -m g3n_compile.bench`: g3n-bench (how its worker processes are started)."""

import sys

from .cli import main

sys.exit(main())
