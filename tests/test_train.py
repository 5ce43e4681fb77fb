"""The trainer end to end on the bundled digits: outputs, resume after SIGKILL (bitwise), damaged
checkpoints, NaN guard, input errors, and fine-tuning at a new resolution and class count."""

import json
import os
import re
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs.vit import get_config
from vit_jax import checkpoint
from vit_jax.interop import resize_posemb
from vit_jax.interop.tree import flatten
from vit_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.width": 16, "model.depth": 1, "model.mlp_dim": 32, "model.num_heads": 2, "model.stem_width": 8,
        "batch_size": 16, "eval_batch_size": 64, "total_steps": 12, "log_steps": 4, "eval_steps": 12,
        "checkpoint_steps": 4, "optim.schedule.warmup_steps": 2, "num_devices": 1}  # sharding: test_sharding.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny(data_dir, **overrides):
  c = get_config()
  for key, value in {**TINY, "data.data_dir": data_dir, **overrides}.items():
    *path, leaf = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def flags_of(data_dir, **overrides):
  return [f"--config.{k}={v}" for k, v in {**TINY, "data.data_dir": data_dir, **overrides}.items()]


def params_at(workdir, step=None):
  path = os.path.join(workdir, "checkpoints", str(step)) if step else workdir
  return flatten(checkpoint.load(path)[0])


def assert_bitwise(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_training_writes_metrics_checkpoints_and_config(tmp_path, data_dir, capsys):
  final = trainer.train_and_evaluate(tiny(data_dir), str(tmp_path))
  assert 0 <= final["eval/accuracy"] <= 1 and final["eval/loss"] > 0
  out = capsys.readouterr().out
  assert "step 4/12 (33%) | loss" in out and "img/s" in out and "ETA" in out
  events = read_metrics(tmp_path)
  names = set().union(*events)
  assert {"step", "train/loss", "train/lr", "train/grad_norm", "perf/img_per_sec", "eval/accuracy",
          "eval/loss"} <= names
  assert [e["step"] for e in events if "train/loss" in e] == [4, 8, 12]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "4", "8"]
  assert os.listdir(tmp_path / "tensorboard")
  assert json.loads((tmp_path / "config.json").read_text())["model"]["width"] == 16
  # The saved config makes the checkpoint convertible without any settings.
  params, config = checkpoint.load(tmp_path)
  assert config["model"]["num_classes"] == 10 and config["image_size"] == [8, 8]
  # Nothing left to do: rerunning only evaluates the final state.
  again = trainer.train_and_evaluate(tiny(data_dir), str(tmp_path))
  assert again == pytest.approx(final)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_is_bitwise_identical(tmp_path, data_dir):
  flags = flags_of(data_dir, total_steps=60, checkpoint_steps=3, eval_steps=60, log_steps=3)
  run = lambda workdir: subprocess.Popen([sys.executable, "main.py", f"--workdir={workdir}", *flags], cwd=ROOT,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  reference = run(tmp_path / "reference")
  assert reference.wait(timeout=600) == 0, reference.stdout.read()[-3000:]

  victim = run(tmp_path / "killed")
  ckpts = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 300
  while not (ckpts.exists() and any(d.isdigit() for d in os.listdir(ckpts))):
    assert victim.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
    time.sleep(0.05)
  time.sleep(random.Random().uniform(0.0, 0.5))  # somewhere in the middle of training (or of a save)
  victim.send_signal(signal.SIGKILL)
  assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  resumed = run(tmp_path / "killed")
  out = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0, out[-3000:]
  assert "resumed from step" in out
  assert_bitwise(params_at(tmp_path / "killed"), params_at(tmp_path / "reference"))


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir, caplog):
  config = tiny(data_dir, total_steps=8)
  trainer.train_and_evaluate(config, str(tmp_path))
  good = params_at(tmp_path, 8)
  for root, _, files in os.walk(tmp_path / "checkpoints" / "8" / "state"):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(os.path.getsize(f.name) // 3, 1))
  trainer.train_and_evaluate(config, str(tmp_path))
  assert "Checkpoint step 8" in caplog.text and "trying the previous one" in caplog.text
  assert any(d.startswith("8.corrupt") for d in os.listdir(tmp_path / "checkpoints"))
  assert_bitwise(params_at(tmp_path, 8), good)  # retrained from step 4 to the same bits


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  """The loss is checked on the device each step and read only at logging, saving and evaluation:
  a run that logs rarely names the same first non-finite step as one that reads every step."""
  diverge = {"optim.lr": 1e30, "optim.clip_norm": 0.0}
  every_step = tiny(data_dir, total_steps=20, checkpoint_steps=1, log_steps=1, **diverge)
  with pytest.raises(trainer.NonFiniteLossError, match="training loss is .* at step (\\d+): stopping") as err:
    trainer.train_and_evaluate(every_step, str(tmp_path / "every_step"))
  first_bad = int(re.search(r"at step (\d+):", str(err.value)).group(1))
  assert 1 < first_bad < 20
  steps = sorted(int(d) for d in os.listdir(tmp_path / "every_step" / "checkpoints") if d.isdigit())
  assert steps[-1] == first_bad - 1
  rare = tiny(data_dir, total_steps=20, checkpoint_steps=first_bad + 1, log_steps=50, **diverge)
  with pytest.raises(trainer.NonFiniteLossError, match=f"training loss is .* at step {first_bad}: stopping"):
    trainer.train_and_evaluate(rare, str(tmp_path / "rare"))
  saved = tmp_path / "rare" / "checkpoints"
  assert not saved.exists() or not any(d.isdigit() for d in os.listdir(saved))  # nothing saved
  last = params_at(tmp_path / "every_step", steps[-1])
  assert all(np.all(np.isfinite(v)) for v in last.values())


@pytest.mark.parametrize("override,message", [
    ("--config.data.image_size=16", "gives images of shape (16, 8, 8, 1) but the model expects (16, 16, 16, 1)"),
    ("--config.model.channels=3", "gives images of shape (16, 8, 8, 1) but the model expects (16, 8, 8, 3)"),
])
def test_wrong_image_shape_is_a_one_line_error(tmp_path, data_dir, override, message):
  done = subprocess.run([sys.executable, "main.py", f"--workdir={tmp_path}", *flags_of(data_dir), override],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
  assert "Traceback" not in done.stderr


def test_unknown_config_key_names_the_closest(tmp_path):
  done = subprocess.run([sys.executable, "main.py", f"--workdir={tmp_path}", "--config.optim.lrr=0.1"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode != 0 and "Traceback" not in done.stderr
  assert 'error: bad command-line flag' in done.stderr and 'Did you mean "lr" instead of "lrr"?' in done.stderr


def write_digit_folder(root, classes=(0, 1, 7)):
  """Three digit classes as 16x16 grey PNGs: a new dataset, resolution and class count."""
  from PIL import Image
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  for split, part in (("train", slice(0, 900)), ("test", slice(900, 1200))):
    for c in classes:
      os.makedirs(root / split / f"digit{c}")
      for i in np.flatnonzero(y[part] == c)[:40]:
        img = np.round(x[part][i].reshape(8, 8) * 255 / 16).astype(np.uint8)
        Image.fromarray(img).resize((16, 16), Image.NEAREST).save(root / split / f"digit{c}" / f"{i}.png")


def test_fine_tune_at_new_resolution_and_class_count(tmp_path, data_dir):
  trainer.train_and_evaluate(tiny(data_dir, total_steps=4), str(tmp_path / "pretrain"))
  write_digit_folder(tmp_path / "folder")
  config = tiny(data_dir, total_steps=1, checkpoint_steps=1, eval_steps=1, log_steps=1, **{
      "data.name": f"folder:{tmp_path / 'folder'}", "data.image_size": 16,
      "data.pp_train": "decode|value_range(-1, 1)", "data.pp_eval": "decode|value_range(-1, 1)",
      "init.path": str(tmp_path / "pretrain"), "optim.lr": 0.0})
  final = trainer.train_and_evaluate(config, str(tmp_path / "finetune"))
  assert 0 <= final["eval/accuracy"] <= 1
  before, after = params_at(tmp_path / "pretrain"), params_at(tmp_path / "finetune", 1)
  assert after["head/kernel"].shape == (16, 3) and before["head/kernel"].shape == (16, 10)
  key = "Transformer/posembed_input/pos_embedding"
  assert after[key].shape == (1, 64, 16)  # 4x4 -> 8x8 tokens (gap pooling: no prefix row)
  np.testing.assert_array_equal(after[key], resize_posemb(before[key], (8, 8), mode="vit_jax"))
  for k in before:  # lr 0: one step leaves every loaded parameter as loaded
    if not k.startswith("head/") and k != key:
      assert np.array_equal(after[k], before[k]), k


def test_tfds_dataset_by_name_trains_end_to_end_on_mock_data(tmp_path, data_dir):
  import tensorflow_datasets as tfds
  config = tiny(data_dir, total_steps=4, checkpoint_steps=4, eval_steps=4, **{
      "data.name": "mnist", "data.pp_train": "decode|resize(8)|flip_lr|value_range(-1, 1)",
      "data.pp_eval": "decode|resize(8)|value_range(-1, 1)", "data.data_dir": None})
  with tfds.testing.mock_data(num_examples=40):
    final = trainer.train_and_evaluate(config, str(tmp_path))
  assert 0 <= final["eval/accuracy"] <= 1  # all 40 mock test examples evaluated (the trainer checks the count)
  assert os.listdir(tmp_path / "checkpoints") == ["4"]
