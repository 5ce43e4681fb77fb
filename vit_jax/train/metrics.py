"""Metrics: JSON lines, TensorBoard events, and the progress line.

`WORKDIR/metrics.jsonl` gets one object per event, `{"step": 100, "train/loss": ...}`,
with names `train/loss`, `train/lr`, `train/grad_norm`, `eval/accuracy`,
`eval/loss`, `perf/img_per_sec`, ...; TensorBoard event files go to
`WORKDIR/tensorboard/`.  Only process 0 writes.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from typing import Any, Mapping


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard files are a convenience; metrics.jsonl is the record
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class Progress:
  """`step 120/500 (24%) | loss 0.4123 | 1520 img/s | elapsed 0:00:12 | ETA 0:00:38`."""

  def __init__(self, total_steps: int, first_step: int, *, stream=None, enabled: bool = True):
    self.total, self.first, self.stream, self.enabled = total_steps, first_step, stream, enabled
    self.start = time.perf_counter()

  def line(self, step: int, metrics: Mapping[str, float]) -> str:
    elapsed = time.perf_counter() - self.start
    done = max(step - self.first, 1)
    eta = (self.total - step) * elapsed / done
    fmt = lambda s: str(datetime.timedelta(seconds=int(s)))
    parts = [f"step {step}/{self.total} ({100 * step / self.total:.0f}%)"]
    for name, short, f in (("train/loss", "loss", "{:.4f}"), ("train/lr", "lr", "{:.2e}"),
                           ("perf/img_per_sec", "img/s", "{:.0f}"), ("perf/pairs_per_sec", "pairs/s", "{:.0f}")):
      if name in metrics and math.isfinite(metrics[name]):
        parts.append(f"{short} {f.format(metrics[name])}")
    parts += [f"elapsed {fmt(elapsed)}", f"ETA {fmt(eta)}"]
    return " | ".join(parts)

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    if self.enabled:
      print(self.line(step, metrics), file=self.stream or sys.stdout, flush=True)
