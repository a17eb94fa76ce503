import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Generated checkpoints (tiny-random) go to a per-run cache unless G3N_CACHE is set."""
    if not os.environ.get("G3N_CACHE"):
        os.environ["G3N_CACHE"] = str(tmp_path_factory.mktemp("g3n-cache"))
