"""Bad input to every command: one `error:` line, a non-zero status, and nothing a user saved touched.

Every case runs against a finished training run and checks that its whole work directory
(checkpoints, config.json, metrics, TensorBoard events) is byte-for-byte unchanged afterwards.
`main.py` runs as a subprocess (its flags are process-global); the other tools' `main(argv)` run
in-process.  Also here: damaged and mismatched checkpoints on resume, one metrics history, safe
writes, image folders of mixed formats, and translate's line handling.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import TINY, flags_of, tiny
from vit_jax import checkpoint, cli, files
from vit_jax.data import input_pipeline, text
from vit_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ fixtures and helpers

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
  """A finished tiny run: checkpoints 4, 8, 12 (each with checksums), config.json, metrics."""
  workdir = tmp_path_factory.mktemp("run") / "work"
  trainer.train_and_evaluate(tiny(data_dir), str(workdir))
  return str(workdir)


def snapshot(root) -> dict[str, str]:
  """sha256 of every file under `root` (or of `root` itself)."""
  if os.path.isfile(root):
    return {"": hashlib.sha256(open(root, "rb").read()).hexdigest()}
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      p = os.path.join(folder, name)
      out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def assert_one_error_line(status, stderr, match):
  assert status not in (0, None), stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and errors[0] == lines[-1], stderr[-2000:]
  assert re.search(match, errors[0]), errors[0]


def run_main(workdir, *flags):
  done = subprocess.run([sys.executable, "main.py", f"--workdir={workdir}", *map(str, flags)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  return done.returncode, done.stderr


def run_tool(main, *argv):
  """A tool's `main(argv)` in-process: (exit status, stderr)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      status = main([str(a) for a in argv])
    except SystemExit as e:
      status = e.code
  return status, err.getvalue()


# ------------------------------------------------------------------ main.py

def run_trainer(data_dir, workdir, **overrides):
  """What `main.py` does in-process: train, and an input error becomes its one `error:` line."""
  try:
    trainer.train_and_evaluate(tiny(data_dir, **overrides), str(workdir))
  except cli.INPUT_ERRORS as e:
    return 1, f"error: {cli.one_line(e)}\n"
  return 0, ""


# (config overrides on top of the run's own, expected message): each against the finished run.
CONFIG_CASES = [
    ({"batch_size": -16}, r"config\.batch_size=-16 must be a positive integer"),
    ({"accumulate": 0}, r"config\.accumulate=0 must be a positive integer"),
    ({"accumulate": 3}, r"accumulate=3 must divide the batch"),
    ({"keep_checkpoints": 0}, r"keep_checkpoints=0 would keep no checkpoint"),
    ({"keep_every_steps": -5}, r"keep_every_steps=-5 must be a positive integer"),
    ({"total_steps": 0}, r"config\.total_steps=0 gives 0 steps"),
    ({"log_steps": 0}, r"config\.log_steps=0 gives 0 steps"),
    ({"total_epochs": 1.0}, r"Give one of total_steps, total_epochs"),
    ({"num_devices": 2, "eval_batch_size": 3}, r"batch of 3 cannot be split evenly over the 2"),
    ({"num_devices": 99}, r"num_devices=99 but only 8 devices"),
    ({"mesh": (("data", 3),)}, r"Mesh \{'data': 3\} needs 3 devices, but there are 1"),
    ({"data.name": "cifar100x"}, r"Unknown dataset 'cifar100x': did you mean cifar100"),
    ({"data.name": "folder:/nonexistent/images"}, r"No image folder at '/nonexistent/images/train'"),
    ({"data.train_split": "trian"}, r"has no split 'trian'"),
    ({"optim.name": "adamx"}, r"Unknown optimizer 'adamx'"),
    # A finished run resumed with changed settings: nothing is set aside, the differences are named.
    ({"ema_decay": 0.999}, r"config changes: ema_decay: 0\.0 -> 0\.999; \d+ state entries differ: "
                           r"ema/.* \(new, not in the checkpoint\)"),
    ({"model.width": 32}, r"model\.width: 16 -> 32; \d+ state entries differ: params/.*shape \(16,\) saved, "
                          r"\(32,\) now"),
    ({"data.image_size": 16}, r"data\.image_size: 8 -> 16; 3 state entries differ: "
                              r"params/Transformer/posembed_input/pos_embedding \(shape \(1, 16, 16\) saved"),
    ({"batch_size": 32}, r"was trained with batch_size=16, not 32"),
]


@pytest.mark.parametrize("overrides,match", CONFIG_CASES, ids=[str(o) for o, _ in CONFIG_CASES])
def test_bad_settings_leave_the_run_untouched(run, data_dir, overrides, match):
  before = snapshot(run)
  assert_one_error_line(*run_trainer(data_dir, run, **overrides), match)
  assert snapshot(run) == before


# The same path end to end through main.py (a process each): exit status and stderr as a user sees them.
MAIN_CASES = [
    (["--config.batch_size=0"], r"config\.batch_size=0 must be a positive integer"),
    (["--config.optim.clip_norm=0.0"], r"saved with other settings \(config changes: optim\.clip_norm: 1\.0 -> "
                                       r"0\.0; \d+ state entries differ: opt_state/.*nothing was changed.*"
                                       r"--config\.init\.path="),
    (["--config.optim.lrr=0.1"], r"bad command-line flag"),
    (["--config=configs/nope.py"], r"bad command-line flag"),
]


@pytest.mark.parametrize("flags,match", MAIN_CASES, ids=[" ".join(f) for f, _ in MAIN_CASES])
def test_main_bad_settings_leave_the_run_untouched(run, data_dir, flags, match):
  before = snapshot(run)
  assert_one_error_line(*run_main(run, *flags_of(data_dir), *flags), match)
  assert snapshot(run) == before


def test_main_bad_workdirs_and_init(run, data_dir, tmp_path):
  before = snapshot(run)
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  cases = [
      (a_file, [], r"--workdir .*a_file is a file, not a directory"),
      (a_file / "sub", [], r"--workdir .*a_file/sub cannot be created: .*a_file is a file"),
      ("/proc/vit_jax_workdir", [], r"--workdir /proc/vit_jax_workdir is not writable"),
      # A checkpoint of another model as init: the key/shape differences, in a fresh workdir that stays empty.
      (tmp_path / "fresh", [f"--config.init.path={run}", "--config.model.width=32"], r"pos_embedding"),
      (tmp_path / "fresh", [f"--config.init.path={tmp_path / 'missing'}"], r"No checkpoint"),
  ]
  for workdir, flags, match in cases[:1]:  # one through main.py, the rest in-process
    assert_one_error_line(*run_main(workdir, *flags_of(data_dir), *flags), match)
  for workdir, flags, match in cases[1:]:
    overrides = dict(f[len("--config."):].split("=", 1) for f in flags)
    overrides = {k: int(v) if v.isdigit() else v for k, v in overrides.items()}
    assert_one_error_line(*run_trainer(data_dir, workdir, **overrides), match)
  assert a_file.read_text() == "not a directory"
  assert not (tmp_path / "fresh").exists()
  assert snapshot(run) == before


# ------------------------------------------------------------------ resume: damage vs. mismatch, one history

def _flip_a_bit_that_changes_values(step_dir) -> str:
  """Flip one bit in the largest array-data file of a saved step, at the first place (10%, 20%, ...) where
  the step still restores, to other values: the damage that only checksums reveal.  Returns the error.

  The arrays are zstd-compressed without a frame checksum, so a flip either breaks decoding, changes
  nothing (unused bits), or silently decodes to other values; this finds the third kind.
  """
  data_files = [os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(step_dir, "state"))
                for name in names if os.path.basename(folder) == "d"]
  target = max(data_files, key=os.path.getsize)
  original = open(target, "rb").read()
  for fraction in np.arange(0.1, 1.0, 0.1):
    data = bytearray(original)
    data[int(len(data) * fraction)] ^= 0x10
    with open(target, "wb") as f:
      f.write(data)
    try:
      checkpoint.load(step_dir)
    except checkpoint.CheckpointError as e:
      if "do not match their checksums" in str(e):
        return str(e)
  raise AssertionError(f"no single-bit flip in {target} changed the restored values")


def _tensorboard_purge_steps(folder) -> list[int]:
  """Steps of the SessionLog START (purge) events in every event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  steps = []
  for name in sorted(os.listdir(folder)):
    data = open(os.path.join(folder, name), "rb").read()
    at = 0
    while at + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        steps.append(event.step)
  return steps


def test_flipped_byte_falls_back_to_the_previous_step_and_metrics_stay_one_history(run, tmp_path, data_dir,
                                                                                  caplog, capsys):
  workdir = tmp_path / "work"
  shutil.copytree(run, workdir)
  # Found by the exported-weights reader (`checkpoint.load`), and by the trainer on resume:
  assert "1 array(s) do not match their checksums" in _flip_a_bit_that_changes_values(workdir / "checkpoints" / "12")

  trainer.train_and_evaluate(tiny(data_dir), str(workdir))
  assert "resumed from step 8" in capsys.readouterr().out
  assert "Checkpoint step 12" in caplog.text and "checksum mismatch in 1 array(s)" in caplog.text
  aside = [d for d in os.listdir(workdir / "checkpoints") if d.startswith("12.corrupt-")]
  assert len(aside) == 1 and str(workdir / "checkpoints" / aside[0]) in caplog.text  # says where
  # Retrained from step 8 to the same bits as the undamaged run.
  again = checkpoint.load(os.path.join(workdir, "checkpoints", "12"))[0]
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(
      checkpoint.load(os.path.join(run, "checkpoints", "12"))[0])))
  # One history: the lines after step 8 were replaced, not appended to; TensorBoard purges from step 9.
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r] == [4, 8, 12]
  assert [r["step"] for r in rows if "eval/loss" in r] == [12]
  assert _tensorboard_purge_steps(workdir / "tensorboard") == [9]


def test_damaged_step_metadata_is_set_aside_not_reported_as_a_mismatch(run, tmp_path, data_dir, caplog):
  workdir = tmp_path / "work"
  shutil.copytree(run, workdir)
  with open(workdir / "checkpoints" / "12" / "state" / "_METADATA", "w") as f:
    f.write("{ not json")
  trainer.train_and_evaluate(tiny(data_dir), str(workdir))
  assert "Checkpoint step 12" in caplog.text and "is damaged" in caplog.text
  assert sorted(d.split(".")[0] for d in os.listdir(workdir / "checkpoints")) == ["12", "12", "4", "8"]


def test_config_changes_are_printed_on_resume(run, tmp_path, data_dir, capsys):
  workdir = tmp_path / "work"
  shutil.copytree(run, workdir)
  trainer.train_and_evaluate(tiny(data_dir, total_steps=16), str(workdir))
  out = capsys.readouterr().out
  assert "resumed from step 12" in out and "config changes since the saved run: total_steps: 12 -> 16" in out
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 16


# ------------------------------------------------------------------ safe writes

def test_write_atomic_uses_fresh_names_and_never_follows_a_symlink(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("keep me")
  target = tmp_path / "out.json"
  os.symlink(victim, target)  # planted: the write must replace the link, not write through it
  for guess in (f".{target.name}.tmp", f".{target.name}.tmp-{os.getpid()}", f"{target.name}.tmp"):
    os.symlink(victim, tmp_path / guess)
  files.write_atomic(target, "new")
  assert victim.read_text() == "keep me"
  assert not os.path.islink(target) and target.read_text() == "new"
  assert sorted(os.listdir(tmp_path)) == sorted(["victim.txt", "out.json", ".out.json.tmp",
                                                  f".out.json.tmp-{os.getpid()}", "out.json.tmp"])


def test_atomic_directory_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
  out = tmp_path / "export"
  out.mkdir()
  (out / "model.safetensors").write_text("old")
  with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
    with files.atomic_directory(out):
      pass
  with pytest.raises(RuntimeError):
    with files.atomic_directory(out, overwrite=True) as tmp:
      open(os.path.join(tmp, "model.safetensors"), "w").write("half")
      raise RuntimeError("killed mid-export")
  assert (out / "model.safetensors").read_text() == "old" and os.listdir(tmp_path) == ["export"]
  with files.atomic_directory(out, overwrite=True) as tmp:
    open(os.path.join(tmp, "model.safetensors"), "w").write("new")
  assert (out / "model.safetensors").read_text() == "new" and os.listdir(tmp_path) == ["export"]


# ------------------------------------------------------------------ convert

def _npz_bytes(arrays):
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _bad_npz_files(tmp_path):
  good = _npz_bytes({"embedding/kernel": np.ones((2, 2, 3, 4), np.float32)})
  files_ = {"truncated.npz": good[:len(good) // 2], "text.npz": b"just some text"}
  with zipfile.ZipFile(tmp_path / "member.npz", "w") as z:
    z.writestr("README.txt", "not an array")
  # A header that declares 10^12 float32 values: refused from the header, before any allocation.
  header = {"descr": "<f4", "fortran_order": False, "shape": (10 ** 6, 10 ** 6)}
  npy = io.BytesIO()
  np.lib.format.write_array_header_1_0(npy, header)
  with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
    z.writestr("embedding/kernel.npy", npy.getvalue() + b"\0" * 64)
  npy = io.BytesIO()
  np.lib.format.write_array_header_1_0(npy, {"descr": "|O", "fortran_order": False, "shape": (2,)})
  with zipfile.ZipFile(tmp_path / "objects.npz", "w") as z:
    z.writestr("embedding/kernel.npy", npy.getvalue() + b"\0" * 16)
  for name, data in files_.items():
    (tmp_path / name).write_bytes(data)


def test_convert_bad_inputs(run, tmp_path):
  from vit_jax.interop import convert
  _bad_npz_files(tmp_path)
  existing = tmp_path / "existing.npz"
  existing.write_bytes(b"someone's file")
  (tmp_path / "existing_dir" / "0").mkdir(parents=True)
  before, before_existing = snapshot(run), snapshot(tmp_path / "existing_dir")
  step = os.path.join(run, "checkpoints", "12")
  cases = [
      (["--input", run, "--to", "orbax", "--output", run], r"would write onto the input"),
      (["--input", run, "--to", "timm", "--output", os.path.join(run, "timm")], r"would write onto the input"),
      (["--input", step, "--to", "hf", "--output", os.path.join(run, "hf")], r"would write onto the input"),
      (["--input", step, "--to", "orbax", "--output", os.path.join(run, "checkpoints")], r"onto the input"),
      (["--input", run, "--to", "vit_jax_npz", "--output", existing], r"already exists.*--overwrite"),
      (["--input", run, "--to", "orbax", "--output", tmp_path / "existing_dir"], r"already exists.*--overwrite"),
      (["--input", tmp_path / "missing", "--to", "hf", "--output", tmp_path / "o1"], r"No checkpoint"),
      (["--input", tmp_path / "truncated.npz", "--to", "hf", "--output", tmp_path / "o2"], r"truncated or corrupt"),
      (["--input", tmp_path / "text.npz", "--to", "hf", "--output", tmp_path / "o3"], r"not a readable \.npz"),
      (["--input", tmp_path / "member.npz", "--to", "hf", "--output", tmp_path / "o4"], r"'README\.txt'.* not a \.npy"),
      (["--input", tmp_path / "huge.npz", "--to", "hf", "--output", tmp_path / "o5"],
       r"declares shape \(1000000, 1000000\) float32 \(4000000000128 bytes\) but holds 192"),
      (["--input", tmp_path / "objects.npz", "--to", "hf", "--output", tmp_path / "o6"], r"Python objects"),
      (["--input", run, "--to", "onnx", "--output", tmp_path / "o7"], r"argument --to: invalid choice: 'onnx'"),
      (["--input", run, "--to", "hf"], r"the following arguments are required: --output"),
      (["--input", run, "--to", "hf", "--output", tmp_path / "o8", "--image_size", "big"],
       r"--image_size 'big' is not H or H,W"),
      (["--input", run, "--to", "hf", "--output", tmp_path / "o9", "--config", "width=32"],
       r"do not match the model settings"),
  ]
  for argv, match in cases:
    assert_one_error_line(*run_tool(convert.main, *argv), match)
  assert snapshot(run) == before and snapshot(tmp_path / "existing_dir") == before_existing
  assert existing.read_bytes() == b"someone's file"
  assert not any(name.startswith("o") and name[1:].isdigit() for name in os.listdir(tmp_path))


def test_convert_overwrite_replaces_an_orbax_output(run, tmp_path):
  from vit_jax.interop import convert
  out = tmp_path / "model"
  assert run_tool(convert.main, "--input", os.path.join(run, "checkpoints", "4"), "--to", "orbax", "--output", out)[0] == 0
  assert run_tool(convert.main, "--input", run, "--to", "orbax", "--output", out, "--overwrite")[0] == 0
  got = checkpoint.load(out)[0]["head"]["kernel"]
  assert np.array_equal(got, checkpoint.load(run)[0]["head"]["kernel"])  # step 12's weights, not step 4's
  assert os.listdir(tmp_path) == ["model"]


# ------------------------------------------------------------------ the other tools

def test_reconstruct_score_maps_and_digits_folder_bad_inputs(run, tmp_path):
  from vit_jax.data import digits_folder, score_maps
  from vit_jax.evaluate import reconstruct
  before = snapshot(run)
  existing = tmp_path / "maps"
  existing.mkdir()
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  cases = [
      (reconstruct.main, ["--workdir", run, "--num", "0"], r"--num 0 must be at least 1"),
      (reconstruct.main, ["--workdir", run], r"is not an MAE run"),
      (reconstruct.main, ["--workdir", tmp_path / "missing"], r"No checkpoint directory"),
      (reconstruct.main, ["--workdir", run, "--output", os.path.join(run, "checkpoints", "r.png")],
       r"would write onto the input"),
      (reconstruct.main, ["--workdir", run, "--output", os.path.join(run, "config.json")], r"onto the input"),
      (reconstruct.main, ["--workdir", run, "--num", "two"], r"argument --num: invalid int value: 'two'"),
      (score_maps.main, ["--teacher", run, "--out", run], r"--out .* would write onto the input"),
      (score_maps.main, ["--teacher", run, "--out", os.path.join(run, "maps")], r"would write onto the input"),
      (score_maps.main, ["--teacher", run, "--out", existing], r"already exists.*--overwrite"),
      (score_maps.main, ["--teacher", run, "--out", tmp_path / "m2", "--k", "0"], r"--k 0 must be at least 1"),
      (score_maps.main, ["--teacher", tmp_path / "missing", "--out", tmp_path / "m3"], r"No checkpoint directory"),
      (digits_folder.main, [existing], r"already exists.*--overwrite"),
      (digits_folder.main, [a_file / "digits"], r"Not a directory|a_file"),
  ]
  for main, argv, match in cases:
    assert_one_error_line(*run_tool(main, *argv), match)
  assert snapshot(run) == before and a_file.read_text() == "x" and os.listdir(existing) == []
  assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


@pytest.fixture(scope="module")
def translator_dir(tmp_path_factory):
  """A (random) transformer seq2seq checkpoint over a tiny character vocabulary: max_len 12."""
  from vit_jax.models.seq2seq import Seq2Seq
  vocab = text.Vocab.build(["abc de"], "char")
  settings = dict(source_vocab=len(vocab), target_vocab=len(vocab), kind="transformer", hidden=16, num_layers=1,
                  num_heads=2, mlp_dim=32, max_len=12)
  model = Seq2Seq(**settings)
  params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.ones((1, 4), jnp.int32),
                      jnp.ones((1, 4), jnp.int32))["params"]
  folder = tmp_path_factory.mktemp("s2s") / "checkpoints"
  saved_vocab = {"level": "char", "tokens": list(vocab.tokens)}
  checkpoint.save(folder, params, config={"task": "seq2seq", "model": settings, "source_vocab": saved_vocab,
                                          "target_vocab": saved_vocab, "source_len": 6, "target_len": 8})
  return str(folder.parent)


def test_translate_bad_flags_and_inputs(translator_dir, monkeypatch):
  from vit_jax import translate
  before = snapshot(translator_dir)
  cases = [
      (["--beam", "-2"], "", r"argument --beam: --beam must be positive, not -2"),
      (["--beam", "two"], "", r"--beam must be a number, not 'two'"),
      (["--alpha", "-0.5"], "", r"--alpha must be >= 0, not -0.5"),
      (["--alpha", "nan"], "", r"--alpha must be >= 0, not nan"),
      (["--batch_size", "0"], "", r"--batch_size must be positive, not 0"),
      (["--plot", os.path.join(translator_dir, "checkpoints", "a.png")], "abc\n", r"would write onto the input"),
      ([], "abc\n" + "a" * 13 + "\n", r"input line 2 is 13 tokens, more than this model's limit of 12"),
  ]
  for argv, stdin, match in cases:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert_one_error_line(*run_tool(translate.main, "--workdir", translator_dir, *argv), match)
  status, err = run_tool(translate.main, "--workdir", "/nonexistent/run")
  assert_one_error_line(status, err, r"No checkpoint directory")
  assert snapshot(translator_dir) == before


def test_translate_keeps_one_output_line_per_input_line(translator_dir, monkeypatch):
  from vit_jax import translate
  monkeypatch.setattr(sys, "stdin", io.StringIO("abc\n\n  \nxyz é\nabcdeabc\n\n"))
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    assert translate.main(["--workdir", translator_dir]) == 0
  lines = out.getvalue().split("\n")[:-1]
  assert len(lines) == 6 and lines[1] == lines[2] == lines[5] == ""
  assert "4 token(s) outside the model's vocabulary were read as unknown: 'x', 'y', 'z', 'é'" in err.getvalue()
  assert "input line 5 is 8 tokens, longer than the 6 the model was trained on" in err.getvalue()


# ------------------------------------------------------------------ image folders

def _save(path, array, mode=None):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)


def _mixed_folder(root):
  """One class of every kind of PNG: grey, 16-bit grey, RGB, RGBA (one transparent pixel), palette."""
  from PIL import Image
  rgb = np.zeros((4, 4, 3), np.uint8)
  rgb[0, 0] = (200, 100, 50)
  for split in ("train", "test"):
    d = os.path.join(root, split, "a")
    _save(os.path.join(d, "grey.png"), np.full((4, 4), 77, np.uint8))
    _save(os.path.join(d, "deep.png"), np.full((4, 4), 257 * 100, np.uint16))
    _save(os.path.join(d, "rgb.png"), rgb)
    rgba = np.dstack([rgb, np.full((4, 4), 255, np.uint8)])
    rgba[1, 1] = (9, 9, 9, 0)
    _save(os.path.join(d, "rgba.png"), rgba, "RGBA")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(os.path.join(d, "palette.png"))
    _save(os.path.join(root, split, "b", "grey.png"), np.full((4, 4), 1, np.uint8))


def test_image_folder_decodes_every_format_to_the_models_channels(tmp_path):
  _mixed_folder(tmp_path)
  src = input_pipeline.get_source(f"folder:{tmp_path}", "train", channels=3)
  images = {os.path.basename(p): src.data[i]["image"] for i, (p, _) in enumerate(src.data.files) if "/a/" in p}
  assert all(v.shape == (4, 4, 3) and v.dtype == np.uint8 for v in images.values())
  assert np.all(images["grey.png"] == 77) and np.all(images["deep.png"] == 100)  # 16-bit scaled, not clipped
  assert tuple(images["rgb.png"][0, 0]) == (200, 100, 50) and tuple(images["palette.png"][0, 0]) == (200, 100, 50)
  assert tuple(images["rgba.png"][1, 1]) == (255, 255, 255) and tuple(images["rgba.png"][0, 0]) == (200, 100, 50)
  grey = input_pipeline.get_source(f"folder:{tmp_path}", "test", channels=1)
  luma = {os.path.basename(p): grey.data[i]["image"] for i, (p, _) in enumerate(grey.data.files) if "/a/" in p}
  assert all(v.shape == (4, 4, 1) for v in luma.values()) and np.all(luma["grey.png"] == 77)
  assert luma["rgb.png"][0, 0, 0] == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # ITU-R 601 luma


def test_image_folder_errors(tmp_path, data_dir, caplog):
  _mixed_folder(tmp_path)
  (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
  flags = [*flags_of(data_dir), f"--config.data.name=folder:{tmp_path}", "--config.data.pp_train=decode",
           "--config.data.pp_eval=decode", "--config.data.image_size=4", "--config.model.patch_size=2"]
  assert_one_error_line(*run_main(tmp_path / "w1", *flags), r"Cannot read image .*train/a/broken\.png "
                                                             r"\(UnidentifiedImageError.*skip_unreadable=True")
  src = input_pipeline.get_source(f"folder:{tmp_path}", "train", channels=1, skip_unreadable=True)
  examples = [src.data[i] for i in range(len(src))]
  assert len(examples) == len(src.data.files) and "Skipping unreadable image" in caplog.text
  (tmp_path / "test" / "c").mkdir()
  (tmp_path / "test" / "c" / "x.png").write_bytes((tmp_path / "test" / "a" / "grey.png").read_bytes())
  assert_one_error_line(*run_main(tmp_path / "w2", *flags), r"Class folder\(s\) \['c'\] of .*/test are missing from "
                                                            r".*/train")
  assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
