"""Run a command in a child process and measure it: wall time and the child's own peak RSS (wait4)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    stdout: str
    wall_seconds: float
    peak_rss_gib: float


def run_measured(command: list[str], what: str) -> Measured:
    """Run ``command``; a non-zero exit stops the benchmark with the tail of its stderr, naming ``what``."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{what} failed:\n{err.read()[-3000:]}")
        return Measured(out.read(), round(wall, 1), round(usage.ru_maxrss / 2**20, 2))
