"""`gs://` work directories without a network: a fake Google Cloud Storage filesystem registered with fsspec
(what `etils.epath` uses for gs:// paths) that stores objects under a local directory.

The trainer, the metrics writer (JSON lines and TensorBoard), the exporters and the checkpoint reader reach
it unchanged; orbax gets the gs:// path itself (recorded here, then served from the same local directory,
since its array writer, tensorstore, has its own GCS client)."""

import json
import os

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.test_train import tiny
from vit_jax.train import trainer


class FakeGCS(LocalFileSystem):
  """gs://bucket/key <-> ROOT/bucket/key."""
  root = None
  protocol = ("gs", "gcs")

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    del finalize_on_close
    super().__init__(*args, **kwargs)

  @classmethod
  def local(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return os.path.join(cls.root, path[len(prefix):])
    return path

  @classmethod
  def _strip_protocol(cls, path):
    return super()._strip_protocol(cls.local(path) if isinstance(path, str) else path)

  def _fake_unstrip(self, path):
    return path


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  FakeGCS.root = str(tmp_path / "gcs")
  os.makedirs(FakeGCS.root)
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  from etils.epath import backend
  backend.fsspec_backend._get_filesystem.cache_clear()
  yield FakeGCS.root
  backend.fsspec_backend._get_filesystem.cache_clear()
  from fsspec.registry import _registry
  for name in ("gs", "gcs"):
    _registry.pop(name, None)  # back to fsspec's own (gcsfs, when installed)


def test_training_in_a_gs_workdir(bucket, monkeypatch, tmp_path):
  import orbax.checkpoint as ocp
  from etils import epath

  seen = []
  real_manager = ocp.CheckpointManager

  def recording_manager(directory, *args, **kwargs):
    seen.append(os.fspath(directory))
    return real_manager(epath.Path(FakeGCS.local(directory)), *args, **kwargs)
  monkeypatch.setattr(ocp, "CheckpointManager", recording_manager)

  final = trainer.train_and_evaluate(tiny(str(tmp_path / "tfds"), total_steps=4, checkpoint_steps=2, eval_steps=4),
                                     "gs://bucket/run")
  assert 0 <= final["eval/accuracy"] <= 1
  assert set(seen) == {"gs://bucket/run/checkpoints"}  # no os.path.abspath mangling of the URI
  run = os.path.join(bucket, "bucket", "run")
  assert json.load(open(os.path.join(run, "config.json")))["model"]["width"] == 16
  with open(os.path.join(run, "metrics.jsonl")) as f:
    events = [json.loads(line) for line in f]
  assert [e["step"] for e in events if "train/loss" in e] == [4]
  assert any("eval/accuracy" in e for e in events)
  assert [f for f in os.listdir(os.path.join(run, "tensorboard")) if f.startswith("events.out.tfevents")]
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2", "4"]
  # Rerunning resumes from the gs:// checkpoints and appends to the same metrics file.
  again = trainer.train_and_evaluate(tiny(str(tmp_path / "tfds"), total_steps=4), "gs://bucket/run")
  assert again == pytest.approx(final)


def test_exporters_write_and_read_gs_paths(bucket):
  from vit_jax.interop import common, npz

  flat = {"head/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "head/bias": np.ones(3, np.float32)}
  assert npz.write_npz("gs://bucket/export/model.npz", flat) == "gs://bucket/export/model.npz"
  back = npz.read_npz("gs://bucket/export/model.npz")
  assert sorted(back) == sorted(flat) and all(np.array_equal(back[k], flat[k]) for k in flat)
  assert os.path.isfile(os.path.join(bucket, "bucket", "export", "model.npz"))
  out = common.write_folder("gs://bucket/hf", {"w": np.zeros(2, np.float32)}, {"model_type": "vit"})
  assert out == "gs://bucket/hf"
  assert sorted(os.listdir(os.path.join(bucket, "bucket", "hf"))) == ["config.json", "model.safetensors"]
