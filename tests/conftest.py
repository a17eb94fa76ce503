import os
import sys
from pathlib import Path

import pytest

from g3n_compile.compile import compile_model

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Generated checkpoints (tiny-random) go to a per-run cache unless G3N_CACHE is set."""
    if not os.environ.get("G3N_CACHE"):
        os.environ["G3N_CACHE"] = str(tmp_path_factory.mktemp("g3n-cache"))


@pytest.fixture(scope="session")
def tiny_out(tmp_path_factory, _private_cache):
    """tiny-random compiled for the CPU (max context 64, chunk 16), once per run; tests that change a folder
    change a copy (`shutil.copytree(tiny_out, tmp_path / ...)`)."""
    out = tmp_path_factory.mktemp("tiny-out") / "tiny"
    compile_model("tiny-random", "cpu", out, max_context=64, chunk=16, log=lambda *_: None)
    return out
