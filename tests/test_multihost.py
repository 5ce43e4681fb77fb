"""Multi-host training with real processes: N processes on localhost, each with K simulated CPU devices,
joined by `jax.distributed.initialize` (gloo), against one process with N * K devices.

Every job runs through `vit_jax.launch.Job`, which bounds it in time and kills every process of the job
when one fails.  The one-process references go through the same launcher (one process that joins a
job of one), so both sides reduce across devices with the same collectives and agree to the bit.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax.interop.tree import flatten
from vit_jax.launch import Job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
JOB_TIMEOUT = 420

# Each test runs its own jobs from start to end: a module fixture shared between tests would be
# rebuilt on every xdist worker that runs one of them.
pytestmark = pytest.mark.slow

TINY_VIT = {"model.width": 16, "model.depth": 1, "model.mlp_dim": 32, "model.num_heads": 4, "model.stem_width": 8,
            "batch_size": 16, "eval_batch_size": 24, "total_steps": 6, "log_steps": 1, "eval_steps": 6,
            "checkpoint_steps": 6, "optim.schedule.warmup_steps": 2, "data.eval_split": "test[:359]"}
TINY_SEQ2SEQ = {"batch_size": 16, "eval_batch_size": 20, "total_steps": 6, "log_steps": 1,
                "eval_steps": 6, "checkpoint_steps": 6, "optim.schedule.warmup_steps": 2,
                "data.text": dict(level="char", test_fraction=0.2, split_seed=0, limit=None, numbers=16, dates=64,
                                  sentences=0, corpus_seed=0, plain_spaces=True)}


def specs(root, data_dir, processes):
  """The equivalence runs, in order (later runs read earlier checkpoints); `processes` picks mesh_dcn."""
  vit = lambda **o: {"config": "configs.vit", "overrides": {**TINY_VIT, "data.data_dir": data_dir, **o}}
  runs = {
      # data parallel; an evaluation split of 359 examples: divides neither the batch (24) nor 2 processes
      "data": vit(),
      # FSDP with every parameter sharded, fine-tuned from the data run's checkpoint (head reset)
      "fsdp_finetune": vit(mesh=[["fsdp", -1]], fsdp_min_size=0, **{"init.path": f"{root}/data"}),
      # 2-way data x 2-way tensor, the tensor pairs split across the two processes
      "data_x_tensor": vit(mesh=[["data", 2], ["tensor", 2]], mesh_dcn=[["tensor", 2]] if processes == 2 else None),
      "mae": {"config": "configs.mae", "overrides": {
          "model.width": 16, "model.depth": 1, "model.mlp_dim": 32, "model.num_heads": 2, "model.decoder_width": 16,
          "model.decoder_depth": 1, "model.decoder_mlp_dim": 32, "model.decoder_heads": 2,
          **{k: v for k, v in TINY_VIT.items() if not k.startswith("model.")}, "data.data_dir": data_dir}},
      "deit": {"config": "configs.deit", "arg": f"teacher={root}/data", "overrides": {
          "model.width": 16, "model.depth": 1, "model.mlp_dim": 32, "model.num_heads": 2,
          **{k: v for k, v in TINY_VIT.items() if not k.startswith("model.")}, "data.data_dir": data_dir}},
      # the Transformer: the recurrent models' backward loops all-reduce weight gradients at every time step,
      # which across processes (gloo) costs seconds per step on this machine
      "seq2seq": {"config": "configs.seq2seq", "arg": "model=transformer,layers=1,hidden=16",
                  "overrides": TINY_SEQ2SEQ},
  }
  return {name: dict(spec, workdir=f"{root}/{name}") for name, spec in runs.items()}


def compile_cache(tmp_path):
  """An environment whose processes share compiled programs (runs of one topology compile the same
  programs; a cached program is the same program, so results stay bitwise equal): test time only."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_job(command, processes, devices, timeout=JOB_TIMEOUT, **kwargs):
  job = Job(command, processes, devices, cwd=ROOT, echo=False, **kwargs)
  codes = job.wait(timeout)
  return job, codes


def describe(job, codes):
  return f"exit statuses {codes}\n" + "\n".join(f"--- process {i}\n{job.output(i)[-4000:]}"
                                                for i in range(len(codes)))


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def params_at(workdir):
  return flatten(checkpoint.load(workdir)[0])


def assert_bitwise(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def equivalence_jobs(tmp_path, data_dir):
  """{topology: {run name: workdir}}, and {topology: {run name: mesh layout}}, for 2 x 2 and 1 x 4."""
  workdirs, layouts = {}, {}
  for processes, devices in ((2, 2), (1, 4)):
    root = str(tmp_path / f"mh{processes}x{devices}")
    runs = specs(root, data_dir, processes)
    os.makedirs(root)
    spec_file = os.path.join(root, "specs.json")
    with open(spec_file, "w") as f:
      json.dump(list(runs.values()), f)
    job, codes = run_job([WORKER, spec_file], processes, devices)
    assert codes == [0] * processes, describe(job, codes)
    workdirs[processes, devices] = {name: spec["workdir"] for name, spec in runs.items()}
    printed = [json.loads(line[len("mesh: "):]) for line in job.output(0).splitlines() if line.startswith("mesh: ")]
    layouts[processes, devices] = dict(zip(runs, printed))
  return workdirs, layouts


def test_two_processes_train_and_evaluate_as_one(tmp_path):
  """2 processes x 2 devices against 1 process x 4 devices, same configs and seed: per-step losses (to 1e-5)
  and final evaluations (exactly) for every run of `specs`."""
  workdirs, layouts = equivalence_jobs(tmp_path, str(tmp_path / "tfds"))
  losses = lambda events: [(e["step"], e["train/loss"]) for e in events if "train/loss" in e]
  evals = lambda events: {k: v for e in events for k, v in e.items() if k.startswith("eval")}
  for name in workdirs[2, 2]:
    many, one = read_metrics(workdirs[2, 2][name]), read_metrics(workdirs[1, 4][name])
    assert len(losses(many)) >= 5, name
    assert [s for s, _ in losses(many)] == [s for s, _ in losses(one)], name
    np.testing.assert_allclose([v for _, v in losses(many)], [v for _, v in losses(one)], rtol=1e-5, err_msg=name)
    assert evals(many) and evals(many) == evals(one), name

  # The evaluation split has 359 examples (neither the eval batch of 24 nor 2 processes divides it): the
  # trainer checks that it counted each once, and the accuracy is a whole number of examples.
  for topology in ((2, 2), (1, 4)):
    accuracy = [e for e in read_metrics(workdirs[topology]["data"]) if "eval/accuracy" in e][-1]
    assert abs(accuracy["eval/accuracy"] * 359 - round(accuracy["eval/accuracy"] * 359)) < 1e-6

  # mesh_dcn put each tensor pair on both processes; the default data mesh keeps process order.
  layout = layouts[2, 2]["data_x_tensor"]
  processes = np.asarray(layout["processes"])  # [data 2, fsdp 1, tensor 2]
  assert layout["axes"] == ["data", "fsdp", "tensor"] and processes.shape == (2, 1, 2)
  assert all(sorted(pair) == [0, 1] for pair in processes.reshape(2, 2))
  assert np.asarray(layouts[2, 2]["data"]["processes"]).ravel().tolist() == [0, 0, 1, 1]

  # FSDP fine-tuning started from the data run's encoder (its head reset) and trained on: small steps away.
  base, tuned = (params_at(workdirs[2, 2][n]) for n in ("data", "fsdp_finetune"))
  encoder = [k for k in base if not k.startswith("head/")]
  assert any(not np.array_equal(base[k], tuned[k]) for k in encoder)
  assert max(float(np.abs(base[k] - tuned[k]).max()) for k in encoder) < 0.05


# ---------------------------------------------------------------------------------------------- resume

LONG = {**TINY_VIT, "total_steps": 30, "checkpoint_steps": 5, "eval_steps": 30, "log_steps": 1,
        "data.eval_split": "test"}


def main_command(workdir, data_dir, **overrides):
  flags = {**LONG, "data.data_dir": data_dir, **overrides}
  return ["main.py", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def progress_steps(text):
  return [int(line.split()[1].split("/")[0]) for line in text.splitlines()
          if line.startswith("step ") and "/" in line.split()[1]]


def wait_for_step(job, step, deadline_s=300):
  """Block until process 0 has printed the progress line of `step` (or later)."""
  deadline = time.time() + deadline_s
  while time.time() < deadline:
    if any(s >= step for s in progress_steps("".join(job.outputs[0]))):
      return
    assert all(p.poll() is None for p in job.procs), describe(job, [p.poll() for p in job.procs])
    time.sleep(0.05)
  raise AssertionError(f"the run did not reach step {step} in time")


def interrupted(workdir, data_dir, processes, devices, signum, step, process_id=None, env=None):
  """Run main.py as a job, send `signum` to one process (or all) once step `step` is printed; statuses."""
  job = Job(main_command(workdir, data_dir), processes, devices, cwd=ROOT, echo=False, env=env)
  try:
    wait_for_step(job, step)
    job.signal(signum, process_id=process_id)
    codes = job.wait(JOB_TIMEOUT)
  finally:
    job.kill()
  return job, codes


def test_kill_damage_preempt_and_move_hosts_then_end_bitwise_identical(tmp_path):
  """One run, interrupted three ways, ends with the parameters of the uninterrupted 2-process run:
  1. 2 x 2: SIGKILL of process 1 mid-run (process 0, stuck in a collective, is killed by the launcher);
  2. the newest checkpoint is damaged; 2 x 2 restarted: all processes give that step up, process 0 alone
     moves it aside, both resume from the step before; then SIGTERM to process 1 only: both save at one step;
  3. resumed to the end on 2 processes x 2 devices, and (from a copy) on 1 process x 4 devices."""
  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "run")
  reference = str(tmp_path / "reference")
  env = compile_cache(tmp_path)
  job, codes = run_job(main_command(reference, data_dir), 2, 2, env=env)
  assert codes == [0, 0], describe(job, codes)

  # Past steps 5 and 10; without the shared compile cache, whose files a SIGKILL could leave half written.
  job, codes = interrupted(workdir, data_dir, 2, 2, signal.SIGKILL, 17, process_id=1)
  assert codes[1] == -signal.SIGKILL and codes[0] != 0, describe(job, codes)

  ckpts = os.path.join(workdir, "checkpoints")
  newest = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  for root, _, names in os.walk(os.path.join(ckpts, str(newest), "state")):
    for name in names:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(os.path.getsize(f.name) // 3, 1))
  job, codes = interrupted(workdir, data_dir, 2, 2, signal.SIGTERM, newest - 5 + 2, process_id=1, env=env)
  out = job.output(0)
  assert codes == [143, 143], describe(job, codes)
  assert f"resumed from step {newest - 5}" in out
  assert all(f"Checkpoint step {newest}" in job.output(i) for i in range(2)), describe(job, codes)
  assert len([d for d in os.listdir(ckpts) if d.startswith(f"{newest}.corrupt-")]) == 1
  said = [line for line in out.splitlines() if line.startswith("preempted: saved step")]
  assert len(said) == 1, out[-3000:]
  step = int(said[0].split()[3])
  assert newest - 5 < step < 30 and os.path.isdir(os.path.join(ckpts, str(step)))

  # From that preemption checkpoint: on 2 processes again, and (a copy) on 1 process x 4 devices.
  moved = str(tmp_path / "moved")
  shutil.copytree(workdir, moved)
  for where, processes, devices in ((workdir, 2, 2), (moved, 1, 4)):
    job, codes = run_job(main_command(where, data_dir), processes, devices, env=env)
    assert codes == [0] * processes, describe(job, codes)
    assert f"resumed from step {step}" in job.output(0)
    assert_bitwise(params_at(where), params_at(reference))


def test_sigterm_single_process_without_distributed(tmp_path):
  """Plain `python main.py` (no jax.distributed): the SIGTERM handler saves at the next step and exits 143;
  the rerun ends bitwise equal to an uninterrupted run."""
  from tests.helpers import one_device_flags

  data_dir = str(tmp_path / "tfds")
  env = dict(compile_cache(tmp_path), XLA_FLAGS=one_device_flags(os.environ.get("XLA_FLAGS", "")),
             PYTHONUNBUFFERED="1")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  run = lambda workdir: subprocess.Popen([sys.executable, *main_command(workdir, data_dir)], cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  reference = run(tmp_path / "reference")
  out = reference.communicate(timeout=JOB_TIMEOUT)[0]
  assert reference.returncode == 0, out[-3000:]
  victim = run(tmp_path / "run")
  lines = []
  try:
    for line in victim.stdout:
      lines.append(line)
      if line.startswith("step 3/"):
        victim.send_signal(signal.SIGTERM)
        break
    lines += victim.communicate(timeout=JOB_TIMEOUT)[0].splitlines(keepends=True)
  finally:
    victim.kill()
  out = "".join(lines)
  assert victim.returncode == 143, out[-3000:]
  assert sum(line.startswith("preempted: saved step") for line in lines) == 1, out[-3000:]
  resumed = run(tmp_path / "run")
  out = resumed.communicate(timeout=JOB_TIMEOUT)[0]
  assert resumed.returncode == 0 and "resumed from step" in out, out[-3000:]
  assert_bitwise(params_at(tmp_path / "run"), params_at(tmp_path / "reference"))
