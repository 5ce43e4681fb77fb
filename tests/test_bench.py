"""The benchmark scripts run end to end on the smallest inputs (they measure nothing here; `make bench` does)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import one_device_flags

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "vit_step": ["--variant", "Ti/16", "--resolution", "32", "--batch", "2", "--steps", "1", "--rounds", "1",
                 "--compile-depths", ""],
    "decode": ["--models", "lstm-luong", "--batch", "2", "--source_len", "8", "--max_len", "6",
               "--beam", "2", "--repeats", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_bench_script_prints_its_table(script):
  env = dict(os.environ, XLA_FLAGS=one_device_flags(os.environ.get("XLA_FLAGS", "")))
  done = subprocess.run([sys.executable, f"bench/{script}.py", *CASES[script]], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  table = [line for line in done.stdout.splitlines() if line.startswith("|")]
  assert len(table) >= 3, done.stdout  # a header, a separator and at least one row
