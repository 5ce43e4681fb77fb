"""Paths and atomic writes for local directories and object stores alike (`etils.epath`).

`path("gs://bucket/run")` stays a `gs://` URI (epath reaches it through fsspec /
`tf.io.gfile`); a local path is made absolute.  `write_atomic` writes a temporary
file beside the target and replaces the target with it, so a reader never sees a
half-written file and a crash leaves the previous version in place.
"""

from __future__ import annotations

import os

from etils import epath


def is_local(p) -> bool:
  return "://" not in os.fspath(p)


def path(p) -> epath.Path:
  """`p` as an `epath.Path`: local paths absolute (with ~ expanded), URIs unchanged."""
  out = epath.Path(p)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p)))) if is_local(p) else out


def write_atomic(target, data: bytes | str) -> epath.Path:
  """Write `data` to `target` through a temporary file in the same directory, then replace it."""
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
  try:
    with tmp.open("wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      if is_local(tmp):
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(target)
  finally:
    if tmp.exists():
      tmp.unlink()
  return target
