"""User faults as one line: the base class of every error g3n reports to a user, and the top-level handler
that `g3n-compile`, `g3n-run` and `g3n-bench` share.

An error whose cause is what the user gave (a file, an option, a request) subclasses `UserError` and says
in its message what is wrong and what to do; the handler prints it as `PROG: error: MESSAGE` and exits 1.
Anything else is a bug in g3n or a fault of the machine: one line naming it, and the hint to rerun with
`G3N_DEBUG=1`, which lets the traceback through. Ctrl-C and a closed pipe (`g3n-run ... | head`) end
quietly with the shell's usual codes.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

DEBUG_VARIABLE = "G3N_DEBUG"
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 130, 141


class UserError(Exception):
    """A fault in what the user gave; the message is one line that says what and what to do."""


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def one_line(text: str, limit: int = 600) -> str:
    """`text` folded onto one line (a message quoting a file or a tool's output must not spill)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def run_cli(prog: str, main: Callable[[], int]) -> int:
    """`main()`'s exit code, with every exception turned into one line on stderr (see the module doc)."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except UserError as e:
        if debugging():
            raise
        _report(prog, one_line(e))
        return EXIT_ERROR
    except MemoryError:
        if debugging():
            raise
        _report(prog, "out of memory")
        return EXIT_ERROR
    except OSError as e:  # a file that cannot be read or written: the user's to fix
        if debugging():
            raise
        where = f": {e.filename}" if e.filename else ""
        _report(prog, one_line(f"{e.strerror or e}{where}"))
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line instead of a traceback
        if debugging():
            raise
        _report(prog, one_line(f"internal error ({type(e).__name__}: {e}); rerun with {DEBUG_VARIABLE}=1 for the "
                               f"traceback and report it"))
        return EXIT_ERROR


def _report(prog: str, message: str) -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _silence_stdout()
    print(f"{prog}: error: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
