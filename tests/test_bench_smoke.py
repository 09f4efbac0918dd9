"""Every benchmark script runs end to end in its ``--tiny`` mode on the CPU and prints only well-formed JSON rows,
none of them an error row. Why: device time is scarce, and a bench that breaks on the GPU machine (as ``bench/e2e.py``
did once when the manager began reading a component's file size, which its in-memory models do not have) costs a
call; its tiny mode runs the same code paths here in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RUNS = {
    "e2e-quick": ["bench/e2e.py", "--tiny", "--plan", "quick", "--no-extras"],
    "e2e-wan22": ["bench/e2e.py", "--tiny", "--plan", "wan22", "--no-extras"],
    "host-ram-short": ["bench/host_ram.py", "--tiny", "--i2v", "--ram-gb", "0.001"],  # every "auto" limit exceeded
    "vae": ["bench/vae.py", "--tiny"],
    "layerwise": ["bench/layerwise.py", "--tiny"],
    "lean-block": ["bench/lean_block.py", "--tiny"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_bench_runs_in_its_tiny_mode(name, tmp_path):
    args = list(RUNS[name])
    if name in ("host-ram-short", "layerwise"):
        args += ["--workdir", str(tmp_path / "work")]
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # rows to stdout only, nothing written beside
    env["VIDEO_OFFLOAD_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows, done.stdout[-2000:]
    errors = [row for row in rows if "error" in row]
    assert not errors, errors
