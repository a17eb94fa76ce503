"""Each measurement in a process of its own (`g3n-bench --worker`), so that its peak RSS is its own and its memory
is given back before the next starts; the parent samples the RSS of the whole process tree (iree-compile
included) for the host RAM a compile needs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

from . import BenchError


def run_worker(task: dict) -> dict:
    """Run a worker; its result, its peak RSS and the peak RSS of its whole process tree (sampled)."""
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, "-m", "g3n_compile.bench", "--worker", json.dumps(task)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    sampler = _TreeMemory(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    sampler.stop()
    if proc.returncode:
        raise BenchError(f"the {task['kind']} step failed (exit code {proc.returncode}; its error is printed above)")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_bytes"] = max(result.pop("self_max_rss_bytes"), sampler.peak_rss)
    result["peak_anon_bytes"] = sampler.peak_anon
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


class _TreeMemory:
    """Samples the summed RSS (and its anonymous part) of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_anon = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._done.set()
        self._thread.join()

    def _sample(self):
        while not self._done.wait(self.interval):
            rss = anon = 0
            for pid in _descendants(self.pid):
                fields = _status(pid)
                rss += fields.get("VmRSS", 0)
                anon += fields.get("RssAnon", 0)
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)


def _descendants(root: int) -> list[int]:
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _status(pid: int) -> dict[str, int]:
    """Memory fields (bytes) of /proc/<pid>/status."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines) if v.strip().endswith("kB")}


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def self_max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
