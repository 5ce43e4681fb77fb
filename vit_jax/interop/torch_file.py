"""PyTorch weight files read without torch, and without running anything they contain.

    from vit_jax.interop import torch_file
    state_dict = torch_file.load("deit_base_distilled_patch16_224-df68dfff.pth")   # {name: np.ndarray}
    state_dict = torch_file.load("model.safetensors")

`torch.save` files (`.pth`, `.pt`, `.bin`, `.pth.tar`) are zip archives holding a pickle
(`<root>/data.pkl`) whose tensors point at raw storages (`<root>/data/<key>`).  Unpickling
arbitrary files runs arbitrary code, so the pickle is read by an unpickler that resolves
globals from an explicit allow-list, each bound to our own inert implementation:

  * tensors: `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter` (+ `_with_state`) and the
    typed storage classes (`torch.FloatStorage`, `HalfStorage`, `BFloat16Storage`, ...), rebuilt as
    numpy arrays with their offsets and strides, storages shared between tensors read once;
  * containers: `collections.OrderedDict` (a state dict's `_metadata` is accepted and dropped);
  * what training scripts wrap around the weights (`{"model": ..., "optimizer": ..., "args":
    Namespace(...)}`): `argparse.Namespace` and a few value types (`torch.device`, paths, numpy
    scalars) become inert records that are never called.

Any other global is refused with an error naming it, before anything is called: a pickle that
reaches `os.system`, `builtins.eval`, `subprocess.Popen` or `posix.system` fails to load and does
nothing.  Pre-1.6 (non-zip) files and TorchScript archives are refused with how to re-save them.

`.safetensors` files are read after checking the header: size bounds, UTF-8 JSON, known dtypes,
every tensor's byte range matching its shape, ranges in order without gaps or overlaps, and no
bytes after the last one.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import tarfile
import zipfile
from typing import Any, Mapping

import numpy as np

from vit_jax.interop.tree import CheckpointError

# The first bytes of a pre-1.6 `torch.save` stream: pickled protocol 2, then the long magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_RESAVE = ("re-save it with PyTorch >= 1.6 where it loads: torch.save(torch.load(f, weights_only=True), "
           "'new.pth'), or as safetensors")


def _bfloat16():
  import ml_dtypes
  return np.dtype(ml_dtypes.bfloat16)


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
  """What `torch.FloatStorage` etc. stand for: a dtype."""

  def __init__(self, name: str):
    dtype = _STORAGE_DTYPES[name]
    self.name, self.dtype = name, _bfloat16() if dtype == "bfloat16" else np.dtype(dtype)


class _Record:
  """An inert stand-in for metadata objects (argparse.Namespace, paths, devices): holds what it was given."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state


def _opaque(module: str, name: str) -> type:
  return type(name, (_Record,), {"__module__": f"<inert {module}>"})


def _rebuild_tensor(storage, offset, size, stride, *_):
  return storage.view(offset, size, stride)


def _rebuild_parameter(data, *_):
  return data


def _codecs_encode(text, encoding="latin1"):
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
    raise CheckpointError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}: not a weights file.")
  return text.encode(encoding)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}
# Values that training scripts store next to the weights; kept as inert records, never called.
_METADATA_TYPES = {("argparse", "Namespace"), ("torch", "device"), ("pathlib", "PosixPath"),
                   ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("numpy.core.multiarray", "scalar"),
                   ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}


class _Storage:
  """One `data/<key>` record of the archive, read when a tensor first needs it."""

  def __init__(self, archive: zipfile.ZipFile, record: str, dtype: np.dtype, numel: int, swap: bool, path: str):
    self.archive, self.record, self.dtype, self.numel, self.swap, self.path = archive, record, dtype, numel, swap, path
    self._flat: np.ndarray | None = None

  def flat(self) -> np.ndarray:
    if self._flat is None:
      try:
        info = self.archive.getinfo(self.record)
      except KeyError:
        raise CheckpointError(f"{self.path!r} has no record {self.record!r} for a tensor: the file is "
                              "truncated or corrupt.") from None
      expected = self.numel * self.dtype.itemsize
      if info.file_size != expected:
        raise CheckpointError(f"{self.path!r}: storage {self.record!r} holds {info.file_size} bytes, not the "
                              f"{expected} its {self.numel} {self.dtype} values need: the file is corrupt.")
      flat = np.frombuffer(self.archive.read(self.record), self.dtype)
      self._flat = flat.byteswap() if self.swap else flat
    return self._flat

  def view(self, offset, size, stride) -> np.ndarray:
    ok = (isinstance(offset, int) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
          and len(size) == len(stride) and all(isinstance(v, int) and v >= 0 for v in size + stride))
    if not ok:
      raise CheckpointError(f"{self.path!r}: a tensor has an invalid layout (offset {offset!r}, size {size!r}, "
                            f"stride {stride!r}): the file is corrupt.")
    if 0 in size:
      return np.zeros(size, self.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= self.numel:
      raise CheckpointError(f"{self.path!r}: a tensor of size {size} (offset {offset}, stride {stride}) reaches "
                            f"element {last} of a storage of {self.numel}: the file is corrupt.")
    item = self.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(self.flat()[offset:], size, tuple(s * item for s in stride))
    return np.array(view)  # a copy: contiguous, owning its memory


class _Unpickler(pickle._Unpickler):  # the Python implementation: its opcodes can be restricted
  """Globals from the allow-list only; BUILD (setting an object's state) only on dicts and inert records."""

  dispatch = dict(pickle._Unpickler.dispatch)

  def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, swap: bool, path: str):
    super().__init__(io.BytesIO(data))
    self.archive, self.root, self.swap, self.path = archive, root, swap, path
    self.storages: dict[str, _Storage] = {}

  def load_build(self):
    if not isinstance(self.stack[-2], (collections.OrderedDict, _Record)):
      raise CheckpointError(f"{self.path!r} sets the state of a {type(self.stack[-2]).__name__}, which a weights "
                            "file never does: refused.")
    pickle._Unpickler.load_build(self)

  dispatch[pickle.BUILD[0]] = load_build

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if (module, name) in _METADATA_TYPES:
      return _opaque(module, name)
    raise CheckpointError(f"{self.path!r} refers to {module}.{name}, which a weights file never needs: refused, "
                          "nothing was run. Load it only if you trust it, and re-save its state_dict as "
                          "safetensors.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise CheckpointError(f"{self.path!r}: unknown persistent id {str(pid)[:80]}: not a torch.save weights file.")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int) \
        or numel < 0:
      raise CheckpointError(f"{self.path!r}: unsupported storage {str(pid)[:80]}.")
    if key in self.storages:
      if self.storages[key].dtype != storage_type.dtype:
        raise CheckpointError(f"{self.path!r}: storage {key!r} is used with two dtypes: the file is corrupt.")
      return self.storages[key]
    storage = _Storage(self.archive, f"{self.root}data/{key}", storage_type.dtype, numel, self.swap, self.path)
    self.storages[key] = storage
    return storage


def _read_torch_zip(path: str, data: bytes) -> Any:
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = archive.namelist()
  except (zipfile.BadZipFile, EOFError, ValueError) as e:
    raise CheckpointError(f"{path!r} is not a readable torch.save file ({type(e).__name__}: {e}): it is "
                          "truncated or corrupt.") from None
  if not names or "/" not in names[0]:
    raise CheckpointError(f"{path!r} is a zip archive but not a torch.save file (no <root>/data.pkl).")
  root = names[0].split("/")[0] + "/"
  if f"{root}constants.pkl" in names:
    raise CheckpointError(f"{path!r} is a TorchScript archive (torch.jit.save), not weights: save the model's "
                          "state_dict() with torch.save or safetensors instead.")
  if f"{root}data.pkl" not in names:
    raise CheckpointError(f"{path!r} has no {root}data.pkl: not a torch.save file, or truncated.")
  byteorder = archive.read(f"{root}byteorder").decode().strip() if f"{root}byteorder" in names else "little"
  swap = byteorder != "little"  # numpy dtypes here are little-endian on the hosts this runs on
  try:
    unpickler = _Unpickler(archive.read(f"{root}data.pkl"), archive, root, swap, path)
    return unpickler.load()
  except CheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
          zipfile.BadZipFile) as e:
    raise CheckpointError(f"{path!r}: the pickle in it cannot be read ({type(e).__name__}: {e}): the file is "
                          "corrupt or not a weights file.") from None


# ---------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
                       "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100_000_000


def _read_safetensors(path: str, data: bytes) -> dict[str, np.ndarray]:
  bad = lambda why: CheckpointError(f"{path!r} is not a valid safetensors file: {why}.")
  if len(data) < 8:
    raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
  n = int.from_bytes(data[:8], "little")
  if n > _MAX_HEADER or 8 + n > len(data):
    raise bad(f"the header claims {n} bytes, but the file has {len(data) - 8} after the length")
  try:
    header = json.loads(data[8:8 + n].decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise bad(f"the header is not UTF-8 JSON ({e})") from None
  if not isinstance(header, dict):
    raise bad("the header is not a JSON object")
  header.pop("__metadata__", None)
  entries = []
  for name, spec in header.items():
    if not (isinstance(spec, dict) and spec.get("dtype") in _SAFETENSORS_DTYPES and isinstance(spec.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in spec["shape"])
            and isinstance(spec.get("data_offsets"), list) and len(spec["data_offsets"]) == 2
            and all(isinstance(o, int) and o >= 0 for o in spec["data_offsets"])):
      raise bad(f"entry {name!r} is malformed ({str(spec)[:120]})")
    dtype = _SAFETENSORS_DTYPES[spec["dtype"]]
    dtype = _bfloat16() if dtype == "bfloat16" else np.dtype(dtype)
    begin, end = spec["data_offsets"]
    size = int(np.prod(spec["shape"], dtype=object)) * dtype.itemsize  # Python ints: no overflow
    if end < begin or end - begin != size:
      raise bad(f"entry {name!r} spans bytes [{begin}, {end}) but its shape {spec['shape']} {spec['dtype']} needs "
                f"{size}")
    entries.append((begin, end, name, dtype, tuple(spec["shape"])))
  entries.sort(key=lambda e: (e[0], e[1]))
  position = 0
  for begin, end, name, _, _ in entries:
    if begin != position:
      raise bad(f"entry {name!r} starts at byte {begin}, not {position} ("
                f"{'overlapping the previous one' if begin < position else 'a gap before it'})")
    position = end
  if 8 + n + position != len(data):
    raise bad(f"the tensors end at byte {8 + n + position} but the file has {len(data)}")
  buffer = memoryview(data)[8 + n:]
  return {name: np.frombuffer(buffer[b:e], dtype).reshape(shape).copy() for b, e, name, dtype, shape in entries}


# ---------------------------------------------------------------------------- entry points

def read(path: str | os.PathLike) -> Any:
  """The object a PyTorch weights file holds, tensors as numpy arrays (safetensors: a flat dict)."""
  from vit_jax.files import path as as_path

  source = as_path(path)
  path = os.fspath(source)
  if not source.is_file():
    raise CheckpointError(f"No checkpoint file at {path!r}.")
  data = source.read_bytes()
  if data[:4] == b"PK\x03\x04":
    return _read_torch_zip(path, data)
  if data.startswith(_LEGACY_MAGIC):
    raise CheckpointError(f"{path!r} was written by torch.save before PyTorch 1.6 (the legacy format), which is "
                          f"not read without torch: {_RESAVE}.")
  if _is_legacy_tar(data):
    raise CheckpointError(f"{path!r} is a legacy tar torch.save file, which is not read without torch: {_RESAVE}.")
  if (len(data) >= 9 and data[8:9] == b"{") or path.endswith(".safetensors"):
    return _read_safetensors(path, data)
  raise CheckpointError(f"{path!r} is neither a torch.save zip nor a safetensors file: truncated, or another "
                        "format.")


def _is_legacy_tar(data: bytes) -> bool:
  try:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
      return {"storages", "tensors", "pickle"} <= set(t.getnames())
  except (tarfile.TarError, EOFError, ValueError):
    return False


# Where training scripts keep the weights inside a checkpoint dict, in the order timm looks for them.
WEIGHT_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")


def state_dict(obj: Any, *, path: str = "checkpoint") -> dict[str, np.ndarray]:
  """The `{name: array}` weights inside what `read` returned (a state dict, or a training checkpoint
  that wraps one under "model" / "state_dict" / ...); `module.` and `_orig_mod.` prefixes removed."""
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a state dict.")
  if not any(isinstance(v, np.ndarray) for v in obj.values()):
    for key in WEIGHT_KEYS:
      if isinstance(obj.get(key), Mapping):
        return state_dict(obj[key], path=path)
    raise CheckpointError(f"{path!r} holds no weights: its keys are {sorted(map(str, obj))[:12]} (looked for a "
                          f"state dict, or one under {', '.join(WEIGHT_KEYS)}).")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, np.ndarray):
      raise CheckpointError(f"{path!r}: the weights hold {k!r} of type {type(v).__name__}, not a tensor.")
    name = str(k)
    for prefix in ("module.", "_orig_mod."):
      name = name[len(prefix):] if name.startswith(prefix) else name
    out[name] = v
  return out


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`{name: array}` from a `.pth` / `.bin` / `.pt` / `.safetensors` file (see the module docstring)."""
  return state_dict(read(path), path=os.fspath(path))
