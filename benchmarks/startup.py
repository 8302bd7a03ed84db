"""Start-up: wall time of `python -m bot --help`, median of several runs."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def help_seconds(runs: int = 7) -> tuple[float, list[float]]:
    """(median seconds, every run); one unmeasured run first compiles the bytecode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    times: list[float] = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bot", "--help"], cwd=ROOT, env=env,
                              capture_output=True, timeout=60, check=False)
        took = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"`python -m bot --help` exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace')[-300:]}")
        if i:
            times.append(took)
    return statistics.median(times), times
