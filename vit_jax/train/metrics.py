"""Metrics: JSON lines, TensorBoard events, and the progress line.

`WORKDIR/metrics.jsonl` gets one object per event, `{"step": 100, "train/loss": ...}`,
with names `train/loss`, `train/lr`, `train/grad_norm`, `eval/accuracy`,
`eval/loss`, `perf/img_per_sec`, ...; TensorBoard event files go to
`WORKDIR/tensorboard/`.  Only process 0 writes.

A resumed run keeps one history: `metrics.jsonl` loses its lines after the step it
resumes from (rewritten atomically), and the new TensorBoard event file starts with
a purge marker at that step, so TensorBoard drops the old events that follow it.  The work directory is an
`etils.epath` path: on an object store (`gs://...`), where files cannot be
appended to, each write replaces the whole (small) JSON lines file, and the
TensorBoard events are written through epath too.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import sys
import time
from typing import Any, Mapping

from etils import epath

from vit_jax.files import is_local, write_atomic

class _EpathRecordWriter:
  """tensorboardX's record-writer interface over an epath file (object stores: rewritten whole on flush)."""

  def __init__(self, path: str):
    self.path, self.buffer = epath.Path(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathWriterFactory:
  def open(self, path: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard(directory: epath.Path, purge_step: int | None = None):
  try:
    from tensorboardX import SummaryWriter
    from tensorboardX import record_writer
  except ImportError:  # TensorBoard files are a convenience; metrics.jsonl is the record
    return None
  if not is_local(directory):  # route this URI scheme through epath (fsspec), not tensorboardX's own clients
    record_writer.register_writer_factory(str(directory).split("://")[0], _EpathWriterFactory())
  return SummaryWriter(str(directory), purge_step=purge_step)


class MetricWriter:

  def __init__(self, workdir, *, enabled: bool = True, resume_step: int = 0):
    """`resume_step`: the step the run starts from; recorded metrics after it are dropped."""
    self.enabled = enabled
    self._tb = None
    if enabled:
      workdir = epath.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._path = workdir / "metrics.jsonl"
      recorded = self._path.read_text() if self._path.exists() else ""
      kept = _lines_up_to(recorded, resume_step)
      if "".join(kept) != recorded:
        write_atomic(self._path, "".join(kept))
      if is_local(workdir):
        self._jsonl, self._lines = self._path.open("a"), None
      else:
        self._jsonl, self._lines = None, kept
      self._tb = _tensorboard(workdir / "tensorboard", purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    line = json.dumps({"step": int(step), **values}) + "\n"
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:
      self._lines.append(line)
      write_atomic(self._path, "".join(self._lines))
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _lines_up_to(text: str, step: int) -> list[str]:
  """The complete JSON lines of `text` whose step is at most `step` (a torn last line is dropped too)."""
  kept = []
  for line in text.splitlines(keepends=True):
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if line.endswith("\n") and isinstance(record, dict) and int(record.get("step", 0)) <= step:
      kept.append(line)
  return kept


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
