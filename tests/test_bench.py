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
    "memory": ["--variants", "Ti/16", "--devices", "8", "--meshes", "fsdp", "--resolution", "32"],
    "gpu_vit": ["--variant", "Ti/16", "--depth", "2", "--resolution", "32", "--batch", "2", "--steps", "1",
                "--rounds", "1", "--skip-torch"],  # on CPU: the vit_jax half of the GPU benchmark
    "decode": ["--models", "lstm-luong", "--batch", "2", "--source_len", "8", "--max_len", "6",
               "--beam", "2", "--repeats", "1"],
    "seq2seq_step": ["--models", "luong,tf2", "--lengths", "32", "--steps", "1", "--runlocal"],
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


def test_fsdp_splits_parameters_and_optimizer_evenly_over_8_devices():
  """S/16 (22M parameters) with AdamW under FSDP on 8 devices: the compiled step's per-device state (its
  arguments less the batch) is within 1.1x of the whole state / 8."""
  import importlib.util

  import jax
  spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
  memory = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(memory)
  assert jax.device_count() == 8
  m = memory.step_memory("S/16", "fsdp", 8, 1, resolution=64)
  batch_bytes = 64 * 64 * 3 * 4 + 4  # one image and its label per device
  assert m["total_state"] > 21e6 * 4 * 3  # parameters + two AdamW moments, float32
  assert m["state"] <= 1.1 * m["total_state"] / 8
  assert m["args"] - batch_bytes <= 1.1 * m["total_state"] / 8
  replicated = memory.step_memory("S/16", "data", 8, 1, resolution=64)
  assert replicated["args"] - batch_bytes >= m["total_state"]  # the contrast: data parallel holds it all
