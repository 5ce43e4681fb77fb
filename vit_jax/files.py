"""Paths and safe writes for local directories and object stores alike (`etils.epath`).

`path("gs://bucket/run")` stays a `gs://` URI (epath reaches it through fsspec /
`tf.io.gfile`); a local path is made absolute.

Every file is written whole or not at all: `write_atomic` writes a new temporary
file with a unique, unpredictable name in the target's directory (created with
`O_EXCL`, so a planted file or symlink is never followed) and renames it onto the
target; `atomic_directory` builds a whole folder the same way.  A crash leaves the
previous version in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator

from etils import epath


def is_local(p) -> bool:
  return "://" not in os.fspath(p)


def path(p) -> epath.Path:
  """`p` as an `epath.Path`: local paths absolute (with ~ expanded), URIs unchanged."""
  out = epath.Path(p)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p)))) if is_local(p) else out


def write_atomic(target, data: bytes | str) -> epath.Path:
  """Write `data` to `target` through a fresh temporary file in the same directory, then rename it."""
  target = path(target)
  data = data.encode() if isinstance(data, str) else data
  target.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(target):  # object stores: a unique name, then a copy-and-delete rename
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
      tmp.write_bytes(data)
      tmp.replace(target)
    finally:
      if tmp.exists():
        tmp.unlink()
    return target
  fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=os.fspath(target.parent))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users of a shared directory
    os.replace(tmp, os.fspath(target))  # replaces a symlink itself, never the file it points to
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  return target


@contextlib.contextmanager
def atomic_directory(target, *, overwrite: bool = False) -> Iterator[str]:
  """Build a directory under a temporary name beside `target`, then rename it into place.

  Yields the temporary directory's path.  An existing `target` is an error unless `overwrite`,
  in which case it is replaced only once the new directory is complete.  Local paths only.
  """
  target = os.path.abspath(os.fspath(target))
  if os.path.lexists(target) and not overwrite:
    raise FileExistsError(f"{target} already exists: choose another output or pass --overwrite to replace it.")
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o755)
    if os.path.lexists(target):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".old", dir=parent)
      os.rename(target, os.path.join(old, "previous"))  # a file, a folder or a symlink itself
      os.rename(tmp, target)
      shutil.rmtree(old, ignore_errors=True)  # the replaced output, as --overwrite asked
    else:
      os.rename(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def check_writable_directory(p, what: str) -> None:
  """Raise a one-line ValueError unless `p` is a directory that exists or can be created, and is writable.

  Probes by creating (and removing) a temporary file; nothing is left behind.  Object stores are
  not probed (their permissions show at the first write).
  """
  if not is_local(p):
    return
  p = os.path.abspath(os.fspath(p))
  if os.path.exists(p) and not os.path.isdir(p):
    raise ValueError(f"{what} {p} is a file, not a directory: choose another path.")
  existing = p
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"{what} {p} cannot be created: {existing} is a file. Choose another path.")
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ValueError(f"{what} {p} is not writable ({existing}: {e.strerror}): choose a directory you can "
                     "write to.") from None


def _resolved(p) -> str:
  return os.path.realpath(os.fspath(p)) if is_local(p) else os.fspath(path(p))


def _within(inner: str, outer: str) -> bool:
  return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_output(output, source, *, overwrite: bool = False, what: str = "--output",
                 beside: bool = False) -> None:
  """Refuse an `output` that would write onto `source` (a checkpoint, .npz or work directory), and an
  existing `output` unless `overwrite`.  One-line ValueErrors.

  Onto means: the same path, or a folder that holds it; and, unless `beside` (a picture or report
  saved next to a run), anything inside it or inside the work directory that holds it.  Even
  `beside` outputs never go into `checkpoints/` or onto the run's own files.
  """
  from vit_jax.checkpoint import CHECKPOINTS_SUBDIR

  src, out = _resolved(source), _resolved(output)
  marker = f"/{CHECKPOINTS_SUBDIR}/"
  workdir = (src + "/").split(marker)[0].rstrip("/") if marker in src + "/" else src
  run_files = [os.path.join(workdir, n) for n in (CHECKPOINTS_SUBDIR, "config.json", "metrics.jsonl", "tensorboard")]
  onto = _within(src, out) or any(_within(out, f) for f in run_files)
  if not beside:
    onto = onto or _within(out, src) or _within(out, workdir)
  if onto:
    raise ValueError(f"{what} {output} would write onto the input {source}: choose a path outside it.")
  if not overwrite and path(output).exists():
    raise ValueError(f"{what} {output} already exists: choose another path, or pass --overwrite to replace it.")
  if beside and path(output).is_dir():
    raise ValueError(f"{what} {output} is a directory: give a file name.")


def write_png(target, image) -> epath.Path:
  """A PIL image or a uint8 array as a PNG file, written atomically."""
  import io

  import numpy as np
  from PIL import Image

  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image))
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return write_atomic(target, buffer.getvalue())
