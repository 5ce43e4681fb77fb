"""`vit_jax.interop.torch_file`: PyTorch files read without torch, checked against torch itself.

torch writes every file here (`torch.save`, `safetensors.torch`); the reader must give back its
tensors bit for bit (shared storages, offsets, transposed strides, float16, bfloat16, 0-d), find
the weights inside training checkpoints, refuse malicious pickles without running them, and
answer damaged or foreign files with one-line errors.
"""

import argparse
import collections
import io
import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

from vit_jax.interop import torch_file
from vit_jax.interop.tree import CheckpointError


def as_numpy(t: torch.Tensor) -> np.ndarray:
  if t.dtype == torch.bfloat16:
    import ml_dtypes
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def assert_same(ours: dict, theirs: dict):
  assert sorted(ours) == sorted(theirs)
  for k, t in theirs.items():
    want = as_numpy(t)
    assert ours[k].dtype == want.dtype and ours[k].shape == want.shape, k
    assert ours[k].tobytes() == np.ascontiguousarray(want).tobytes(), k


def state_dict():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(40, generator=g)
  return collections.OrderedDict([
      ("patch_embed.proj.weight", torch.randn(8, 3, 2, 2, generator=g)),
      ("blocks.0.attn.qkv.weight", torch.randn(12, 4, generator=g).t()),  # stride (1, 4): not contiguous
      ("blocks.0.attn.qkv.bias", base[4:16]),                            # an offset view ...
      ("blocks.0.mlp.fc1.weight", base[20:40].view(5, 4)),               # ... and another of the same storage
      ("head.weight", torch.randn(3, 4, generator=g).half()),
      ("norm.weight", torch.randn(4, generator=g).bfloat16()),
      ("bn1.num_batches_tracked", torch.tensor(7)),                      # int64, 0-d
      ("empty", torch.zeros(0, 4)),
  ])


def test_torch_save_files_read_bit_for_bit(tmp_path):
  sd = state_dict()
  torch.save(sd, tmp_path / "model.pth")
  assert_same(torch_file.load(tmp_path / "model.pth"), sd)
  # The root folder inside the zip follows the file name; `.pth.tar` included.
  torch.save(sd, tmp_path / "lvvit_s-26M-224-83.3.pth.tar")
  assert_same(torch_file.load(tmp_path / "lvvit_s-26M-224-83.3.pth.tar"), sd)


def test_weights_are_found_inside_training_checkpoints(tmp_path):
  sd = state_dict()
  wrapped = {"model": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
             "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, "epoch": 299,
             "scaler": {"scale": 65536.0}, "args": argparse.Namespace(lr=5e-4, output_dir=pathlib.PosixPath("/out"),
                                                                       device=torch.device("cpu"), blr=None)}
  torch.save(wrapped, tmp_path / "mae_pretrain.pth")
  assert_same(torch_file.load(tmp_path / "mae_pretrain.pth"), sd)
  torch.save({"state_dict": sd, "arch": "vit_base", "version": 2}, tmp_path / "timm.pth.tar")
  assert_same(torch_file.load(tmp_path / "timm.pth.tar"), sd)
  torch.save({"epoch": 3, "args": argparse.Namespace(x=1)}, tmp_path / "no_weights.pth")
  with pytest.raises(CheckpointError, match=r"holds no weights: its keys are \['args', 'epoch'\]"):
    torch_file.load(tmp_path / "no_weights.pth")


def test_safetensors_written_by_torch(tmp_path):
  from safetensors.torch import save_file
  sd = {k: v.contiguous() for k, v in state_dict().items() if k != "blocks.0.mlp.fc1.weight"}
  save_file(sd, tmp_path / "model.safetensors")
  assert_same(torch_file.load(tmp_path / "model.safetensors"), sd)


class Gadget:
  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _zip_with_pickle(path, payload: bytes):
  """A torch.save-shaped archive whose data.pkl is `payload`."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("name,make", [
    ("posix.system", lambda marker: pickle.dumps(Gadget(os.system, f"touch {marker}"), protocol=2)),
    ("(__builtin__|builtins).eval", lambda marker: pickle.dumps(Gadget(eval, f"open({str(marker)!r}, 'w')"), protocol=2)),
    ("subprocess.Popen", lambda marker: pickle.dumps(
        Gadget(__import__("subprocess").Popen, ["touch", str(marker)]), protocol=4)),
    ("(__builtin__|builtins).__import__", lambda marker: pickle.dumps(Gadget(__import__, "os"), protocol=2)),
    # A malicious object hidden inside an otherwise genuine state dict.
    ("posix.system", lambda marker: pickle.dumps({"head.weight": Gadget(os.system, f"touch {marker}")}, protocol=2)),
])
def test_malicious_pickles_are_refused_without_running(tmp_path, name, make):
  marker = tmp_path / "pwned"
  _zip_with_pickle(tmp_path / "evil.pth", make(marker))
  with pytest.raises(CheckpointError, match=rf"refers to {name}, which a weights file never needs: refused"):
    torch_file.load(tmp_path / "evil.pth")
  assert not marker.exists()


def test_a_gadget_spliced_into_a_real_file_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  torch.save(state_dict(), tmp_path / "model.pth")
  with zipfile.ZipFile(tmp_path / "model.pth") as z:
    records = {n: z.read(n) for n in z.namelist()}
  records["model/data.pkl"] = pickle.dumps(Gadget(os.system, f"touch {marker}"), protocol=2)
  with zipfile.ZipFile(tmp_path / "spliced.pth", "w") as z:
    for n, data in records.items():
      z.writestr(n, data)
  with pytest.raises(CheckpointError, match="posix.system"):
    torch_file.load(tmp_path / "spliced.pth")
  assert not marker.exists()


def _safetensors(header: dict, body: bytes, *, length: int | None = None) -> bytes:
  raw = str(header).replace("'", '"').encode()
  return struct.pack("<Q", len(raw) if length is None else length) + raw + body


F32 = lambda shape, b, e: {"dtype": "F32", "shape": shape, "data_offsets": [b, e]}


@pytest.mark.parametrize("data,match", [
    (b"\x01\x02", r"2 bytes, shorter than the 8-byte header length"),
    (_safetensors({"a": F32([2], 0, 8)}, b"\0" * 8, length=10 ** 12), r"the header claims 1000000000000 bytes"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", r"the header is not UTF-8 JSON"),
    (struct.pack("<Q", 2) + b"[]", r"the header is not a JSON object"),
    (_safetensors({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), r"entry 'a' is malformed"),
    (_safetensors({"a": F32([3], 0, 8)}, b"\0" * 8), r"spans bytes \[0, 8\) but its shape \[3\] F32 needs 12"),
    (_safetensors({"a": F32([2], 0, 8), "b": F32([2], 4, 12)}, b"\0" * 12), r"'b' starts at byte 4, not 8 \(overlap"),
    (_safetensors({"a": F32([2], 4, 12)}, b"\0" * 12), r"'a' starts at byte 4, not 0 \(a gap"),
    (_safetensors({"a": F32([2], 0, 8)}, b"\0" * 20), r"the tensors end at byte \d+ but the file has"),
    (_safetensors({"a": F32([4], 0, 16)}, b"\0" * 8), r"the tensors end at byte \d+ but the file has"),
])
def test_bad_safetensors_headers(tmp_path, data, match):
  (tmp_path / "bad.safetensors").write_bytes(data)
  with pytest.raises(CheckpointError, match=match) as e:
    torch_file.load(tmp_path / "bad.safetensors")
  assert "\n" not in str(e.value)


def test_damaged_legacy_and_foreign_files(tmp_path):
  torch.save(state_dict(), tmp_path / "model.pth")
  data = (tmp_path / "model.pth").read_bytes()
  (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])
  torch.save(state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
  (tmp_path / "notes.txt").write_text("hello")
  with zipfile.ZipFile(tmp_path / "short_storage.pth", "w") as z:  # a storage record smaller than declared
    with zipfile.ZipFile(tmp_path / "model.pth") as src:
      for n in src.namelist():
        z.writestr(n, src.read(n)[:3] if n.endswith("data/0") else src.read(n))
  cases = [("truncated.pth", r"not a readable torch.save file .*truncated or corrupt"),
           ("legacy.pth", r"before PyTorch 1\.6 \(the legacy format\).*torch\.save\(torch\.load\(f, weights_only=True\)"),
           ("scripted.pt", r"TorchScript archive"),
           ("notes.txt", r"neither a torch\.save zip nor a safetensors file"),
           ("short_storage.pth", r"storage 'model/data/0' holds 3 bytes, not the"),
           ("missing.pth", r"No checkpoint file")]
  for name, match in cases:
    with pytest.raises(CheckpointError, match=match) as e:
      torch_file.load(tmp_path / name)
    assert "\n" not in str(e.value)
