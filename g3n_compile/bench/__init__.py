"""g3n-bench: speed, memory and size of compiled g3n modules at the real E2B/E4B shapes (cli.py), and everything it
measures with: the engines (engines.py) in worker processes (processes.py), the memory bandwidth (bandwidth.c),
the int4 kernel alone (kernel_driver.c), a per-dispatch profile of decode (decode_profile.py), the roofline
(roofline.py) and the report (report.py)."""

import sys

from runtime.errors import UserError


class BenchError(UserError, RuntimeError):
    """A benchmark that cannot run; the message says why."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
