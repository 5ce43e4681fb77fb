"""Multi-host training with real processes: N processes on localhost, each with K simulated CPU devices,
joined by `jax.distributed.initialize` (gloo), against one process with N * K devices.

Every job runs through `vit_jax.launch.Job`, which bounds it in time and kills every process of the job
when one fails.  The one-process references go through the same launcher (one process that joins a
job of one), so both sides reduce across devices with the same collectives and agree to the bit.
"""

import json
import os
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

# Two groups, each kept on one xdist worker (`--dist loadgroup`) so that its module fixtures run once.
pytestmark = pytest.mark.slow
EQUIVALENCE = pytest.mark.xdist_group("multihost_equivalence")
RESUME = pytest.mark.xdist_group("multihost_resume")

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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory, data_dir):
  """{topology: {run name: workdir}} for 2 processes x 2 devices and 1 process x 4 devices."""
  out = {}
  for processes, devices in ((2, 2), (1, 4)):
    root = str(tmp_path_factory.mktemp(f"mh{processes}x{devices}"))
    runs = specs(root, data_dir, processes)
    spec_file = os.path.join(root, "specs.json")
    with open(spec_file, "w") as f:
      json.dump(list(runs.values()), f)
    job, codes = run_job([WORKER, spec_file], processes, devices)
    assert codes == [0] * processes, describe(job, codes)
    out[(processes, devices)] = {name: spec["workdir"] for name, spec in runs.items()}
    layouts = [json.loads(line[len("mesh: "):]) for line in job.output(0).splitlines() if line.startswith("mesh: ")]
    out[(processes, devices, "mesh")] = dict(zip(runs, layouts))
  return out


@EQUIVALENCE
@pytest.mark.parametrize("name", ["data", "fsdp_finetune", "data_x_tensor", "mae", "deit", "seq2seq"])
def test_two_processes_train_and_evaluate_as_one(equivalence_runs, name):
  """Per-step losses and the final evaluation of 2 processes x 2 devices equal 1 process x 4 devices."""
  many, one = (read_metrics(equivalence_runs[t][name]) for t in ((2, 2), (1, 4)))
  losses = lambda events: [(e["step"], e["train/loss"]) for e in events if "train/loss" in e]
  assert len(losses(many)) >= 5
  steps_many, loss_many = zip(*losses(many))
  steps_one, loss_one = zip(*losses(one))
  assert steps_many == steps_one
  np.testing.assert_allclose(loss_many, loss_one, rtol=1e-5)
  evals = lambda events: {k: v for e in events for k, v in e.items() if k.startswith("eval")}
  assert evals(many) and evals(many) == evals(one)


@EQUIVALENCE
def test_mesh_dcn_puts_each_tensor_pair_on_two_processes(equivalence_runs):
  layout = equivalence_runs[(2, 2, "mesh")]["data_x_tensor"]
  assert layout["axes"] == ["data", "fsdp", "tensor"]
  processes = np.asarray(layout["processes"])  # [data 2, fsdp 1, tensor 2]
  assert processes.shape == (2, 1, 2)
  assert all(sorted(pair) == [0, 1] for pair in processes.reshape(2, 2))  # tensor pairs span the processes
  assert np.asarray(equivalence_runs[(2, 2, "mesh")]["data"]["processes"]).ravel().tolist() == [0, 0, 1, 1]


@EQUIVALENCE
def test_evaluation_counts_every_example_once(equivalence_runs):
  """359 test digits, eval batch 24, 2 processes: the trainer checks the count; the accuracy is a whole
  number of examples out of 359."""
  for topology in ((2, 2), (1, 4)):
    accuracy = [e for e in read_metrics(equivalence_runs[topology]["data"]) if "eval/accuracy" in e][-1]
    correct = accuracy["eval/accuracy"] * 359
    assert abs(correct - round(correct)) < 1e-6


@EQUIVALENCE
def test_fsdp_finetune_shards_parameters_over_processes(equivalence_runs):
  """The fine-tuned run started from the data run's encoder (not its head) and kept training."""
  base, tuned = (params_at(equivalence_runs[(2, 2)][n]) for n in ("data", "fsdp_finetune"))
  with open(os.path.join(equivalence_runs[(2, 2)]["fsdp_finetune"], "config.json")) as f:
    assert json.load(f)["mesh"] == [["fsdp", -1]]
  moved = [k for k in base if not k.startswith("head/") and not np.array_equal(base[k], tuned[k])]
  assert moved  # trained on from the loaded encoder
  diff = max(float(np.abs(base[k] - tuned[k]).max()) for k in base if not k.startswith("head/"))
  assert diff < 0.05  # six small steps from the loaded weights, not a fresh initialisation


# ---------------------------------------------------------------------------------------------- resume

LONG = {**TINY_VIT, "total_steps": 30, "checkpoint_steps": 5, "eval_steps": 30, "log_steps": 1,
        "data.eval_split": "test"}


def main_command(workdir, data_dir, **overrides):
  flags = {**LONG, "data.data_dir": data_dir, **overrides}
  return ["main.py", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def wait_for_step(job, step, deadline_s=300):
  """Block until process 0 has printed the progress line of `step` (or later)."""
  deadline = time.time() + deadline_s
  while time.time() < deadline:
    for line in list(job.outputs[0]):
      if line.startswith("step ") and "/" in line.split()[1] and int(line.split()[1].split("/")[0]) >= step:
        return
    assert all(p.poll() is None for p in job.procs), describe(job, [p.poll() for p in job.procs])
    time.sleep(0.05)
  raise AssertionError("the run did not reach step %d in time" % step)


@pytest.fixture(scope="module")
def reference_2x2(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  job, codes = run_job(main_command(workdir, data_dir), 2, 2)
  assert codes == [0, 0], describe(job, codes)
  return workdir


@RESUME
def test_sigkill_one_process_then_restart_both_past_a_damaged_step_is_bitwise_identical(tmp_path, data_dir, reference_2x2):
  workdir = str(tmp_path / "run")
  job = Job(main_command(workdir, data_dir), 2, 2, cwd=ROOT, echo=False)
  try:
    wait_for_step(job, 17)  # past the checkpoints of steps 5 and 10
    job.signal(signal.SIGKILL, process_id=1)
    codes = job.wait(JOB_TIMEOUT)  # process 0 is stuck in a collective: the launcher kills it
  finally:
    job.kill()
  assert codes[1] == -signal.SIGKILL and codes[0] != 0, describe(job, codes)
  # Damage the newest complete step too: the restarted processes must all give it up, process 0 alone
  # moves it aside, and both resume from the step before.
  ckpts = os.path.join(workdir, "checkpoints")
  newest = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
  for root, _, names in os.walk(os.path.join(ckpts, str(newest), "state")):
    for name in names:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(os.path.getsize(f.name) // 3, 1))
  job, codes = run_job(main_command(workdir, data_dir), 2, 2)
  assert codes == [0, 0], describe(job, codes)
  assert f"resumed from step {newest - 5}" in job.output(0)
  assert all(f"Checkpoint step {newest}" in job.output(i) for i in range(2)), describe(job, codes)
  assert len([d for d in os.listdir(ckpts) if d.startswith(f"{newest}.corrupt-")]) == 1
  assert_bitwise(params_at(workdir), params_at(reference_2x2))


@RESUME
@pytest.mark.parametrize("who", ["one", "all"])
def test_sigterm_saves_then_resume_on_one_process_is_bitwise_identical(tmp_path, data_dir, reference_2x2, who):
  """A preemption notice to one process (or all) stops both at one step, saved; the run then resumes on
  1 process x 4 devices and ends with the parameters of the uninterrupted 2-process run."""
  workdir = str(tmp_path / "run")
  job = Job(main_command(workdir, data_dir), 2, 2, cwd=ROOT, echo=False)
  try:
    wait_for_step(job, 3)
    job.signal(signal.SIGTERM, process_id=1 if who == "one" else None)
    codes = job.wait(JOB_TIMEOUT)
  finally:
    job.kill()
  assert codes == [143, 143], describe(job, codes)
  said = [line for line in job.output(0).splitlines() if line.startswith("preempted: saved step")]
  assert len(said) == 1, job.output(0)[-3000:]
  step = int(said[0].split()[3])
  assert 3 <= step < 30
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  job, codes = run_job(main_command(workdir, data_dir), 1, 4)
  assert codes == [0], describe(job, codes)
  assert f"resumed from step {step}" in job.output(0)
  assert_bitwise(params_at(workdir), params_at(reference_2x2))


@RESUME
def test_sigterm_single_process_without_distributed(tmp_path, data_dir):
  """Plain `python main.py` (no jax.distributed): the SIGTERM handler saves at the next step and exits 143."""
  from tests.helpers import one_device_flags

  env = dict(os.environ, XLA_FLAGS=one_device_flags(os.environ.get("XLA_FLAGS", "")), PYTHONUNBUFFERED="1")
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
