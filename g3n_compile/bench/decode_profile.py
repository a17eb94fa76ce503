"""Where one decode step spends its time: IREE's HAL profiler times every dispatch of one `decode` call.

`iree-run-module --function=decode` runs the compiled folder once with
`--device_profiling_mode=host-execution` (IREE's local CPU devices time each dispatch on the host);
`iree-profile dispatch --dispatch_events --format=jsonl` reads the bundle back. The last submission is
the decode call (earlier ones are initializers). Dispatch times are summed per dispatch and per kind, the
op word IREE puts into each dispatch's name (matmul, matvec, mmt4d, elementwise, reduction, encode, ...), and per
op and shape (`matmul_1x2048x8192_bf16`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from runtime.abi import Manifest

_ELEMENT = {"int64": "i64", "float32": "f32", "bool": "i1"}  # iree-run-module's names
# IREE names dispatches `<function>$async_dispatch_<n>_<op>_<shape>_<types>` (`_encoding_<n>_...` for
# packing); identical executables are shared between functions under the first one's name.
_NAME = re.compile(r"(?:dispatch|encoding)_\d+_(([a-z][a-z0-9]*).*)")


def _tool(name: str) -> str:
    """An IREE tool from the Python environment's scripts folder (else from PATH)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (it comes with iree-base-runtime)")
    return found


def profile_decode(folder: Path, position: int, top: int = 10) -> dict:
    """Per-dispatch times of one decode call of the compiled `folder` at `position`:
    {"step_ms", "dispatches", "by_kind": [{"kind", "ms", "share", "count"}], "top": [{"name", ...}]}."""
    folder = Path(folder)
    m = Manifest.read(folder)
    target = next(iter(m.targets.values()))
    values = {"input_ids": 2, "per_layer_rows": 0, "start": position}  # token 2 (<bos>) at `position`
    inputs = [f"--input={'x'.join(map(str, a.shape))}x{_ELEMENT[a.dtype]}={values[a.name]}"
              for a in m.functions["decode"].args]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "decode.ireeprof"
        subprocess.run([_tool("iree-run-module"), f"--device={target.driver}", f"--module={folder / target.file}",
                        f"--parameters={m.parameters.scope}={folder / m.parameters.file}", "--function=decode", *inputs,
                        "--device_profiling_mode=host-execution", f"--device_profiling_output={bundle}"],
                       check=True, capture_output=True)
        events = subprocess.run([_tool("iree-profile"), "dispatch", "--dispatch_events", "--format=jsonl", str(bundle)],
                                check=True, capture_output=True, text=True).stdout
    dispatches = [e for e in map(json.loads, events.splitlines()) if e.get("type") == "host_dispatch_event"]
    last = max(e["submission_id"] for e in dispatches)
    step = [e for e in dispatches if e["submission_id"] == last]
    total = sum(e["duration_ns"] for e in step)
    by_kind, by_name = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    for e in step:
        name = _NAME.search(e["key"])
        for table, key in ((by_kind, name.group(2) if name else "other"), (by_name, name.group(1) if name else e["key"])):
            table[key][0] += e["duration_ns"]
            table[key][1] += 1

    def rows_of(table, label, limit=None):
        ranked = sorted(table.items(), key=lambda kv: -kv[1][0])[:limit]
        return [{label: k, "ms": ns / 1e6, "share": ns / total, "count": n} for k, (ns, n) in ranked]

    return {"position": position, "step_ms": total / 1e6, "dispatches": len(step),
            "by_kind": rows_of(by_kind, "kind"), "top": rows_of(by_name, "name", top)}
