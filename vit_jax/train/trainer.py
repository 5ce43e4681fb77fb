"""The trainer: one loop for every task, from one CPU to a TPU pod.

Read it top to bottom: mesh -> input -> model -> optimizer -> sharded init ->
resume -> update step -> evaluation -> loop.  The same code runs on any number
of devices and hosts; only `config.mesh` and the launch command change.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from vit_jax import files
from vit_jax.checkpoint import settings_to_json
from vit_jax.data import input_pipeline, preprocess, score_maps
from vit_jax.train import resume
from vit_jax.train import metrics as metrics_lib
from vit_jax.train import multihost, optim, sharding, tasks


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; training stopped before saving anything from that step on."""


class Preempted(Exception):
  """A preemption notice (SIGTERM) arrived: the run saved its state at `step` and stopped."""

  def __init__(self, step: int):
    super().__init__(f"preempted: saved step {step}; rerun the same command to resume")
    self.step = step


def _config_dict(config) -> dict[str, Any]:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _image_size(config) -> tuple[int, int]:
  size = config.data.image_size
  return (size, size) if isinstance(size, int) else tuple(size)


def train_and_evaluate(config, workdir) -> dict[str, float]:
  """Train `config` in `workdir` (resuming whatever is there); returns the final evaluation metrics.

  Raises `Preempted` after saving when a preemption notice (SIGTERM) arrives.
  """
  workdir = files.path(workdir)  # `gs://...` stays a URI for orbax and the writers
  # Everything that can be checked without data is checked before anything is written.
  validate(config)
  files.check_writable_directory(workdir, "--workdir")

  # ---------------------------------------------------------------- mesh
  n = config.get("num_devices")
  if n and jax.process_count() > 1:
    raise ValueError(f"config.num_devices={n} picks devices of one process; with {jax.process_count()} processes "
                     "leave it unset and size the mesh with config.mesh.")
  if n and n > jax.device_count():
    raise ValueError(f"config.num_devices={n} but only {jax.device_count()} devices are visible: lower it.")
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:n] if n else None, dcn=config.get("mesh_dcn"))
  logging.info("Mesh %s over %d devices, %d process(es).", dict(mesh.shape), mesh.size, jax.process_count())
  # Everything below traces under this mesh and maps the activations' logical axis names onto it.
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
    return _train(config, workdir, mesh)


def _positive_int(config, key: str, *, optional: bool = False) -> None:
  value = config.get(key)
  if optional and value in (None, 0):
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{key}={value!r} must be a positive integer"
                     f"{' (or unset)' if optional else ''}.")


def validate(config) -> None:
  """Settings checked before anything is written; each failure names the key and the fix."""
  _positive_int(config, "batch_size")
  _positive_int(config, "eval_batch_size", optional=True)
  _positive_int(config, "accumulate")
  keep = config.get("keep_checkpoints")
  if isinstance(keep, int) and keep < 1:
    raise ValueError(f"config.keep_checkpoints={config.get('keep_checkpoints')!r} would keep no checkpoint: set it "
                     "to 1 or more (config.keep_every_steps keeps more).")
  _positive_int(config, "keep_checkpoints")
  _positive_int(config, "keep_every_steps", optional=True)
  if not isinstance(config.get("seed", 0), int):
    raise ValueError(f"config.seed={config.get('seed')!r} must be an integer.")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 8) -> list[str]:
  """`["optim.clip_norm: 1.0 -> 0.0", ...]` between two config dicts (as written to config.json)."""
  old, new = _flat(saved), _flat(current)
  out = [f"{k}: {json.dumps(old.get(k, '<unset>'))} -> {json.dumps(new.get(k, '<unset>'))}"
         for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]
  return out if len(out) <= limit else out[:limit] + [f"and {len(out) - limit} more"]


def _read_json(path: epath.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except (OSError, ValueError):
    return None


class Program(NamedTuple):
  """What the loop runs, built from the config for a mesh: the task, the sharded state and the update step."""
  task: Any
  dummy: Any
  image_shape: tuple  # (height, width, channels), or Nones for tasks with their own inputs
  tx: Any
  lr_fn: Any
  ema_decay: float
  init_state: Any
  params_sharding: Any
  state_sharding: Any
  abstract_state: Any
  replicated: jax.NamedSharding
  batch_sharding: jax.NamedSharding
  step_fn: Any  # (state, guard, constants, batch) -> (state, guard, metrics), state and guard donated


def build_program(config, mesh, num_classes: int, info=None, *, total_steps: int,
                  steps_per_epoch: float) -> Program:
  """The model, optimizer, sharded state and jitted update step of `config` on `mesh` (call under the
  mesh and `sharding.ACTIVATION_RULES`, as `train_and_evaluate` does)."""
  # ---------------------------------------------------------------- model
  task = tasks.get_task(config, num_classes, info)
  if hasattr(task, "dummy_input"):  # e.g. text: {"source", "target"} ids
    dummy = task.dummy_input()
    h = w = channels = None
  else:
    h, w = _image_size(config)
    channels = task.settings.get("channels", 3)
    dummy = jnp.zeros((1, h, w, channels), jnp.float32)  # shapes for init; parameters do not depend on the batch

  # ---------------------------------------------------------------- optimizer
  variables_shape = jax.eval_shape(task.init, jax.random.key(0), dummy)
  tx, lr_fn = optim.build(config.optim, variables_shape["params"], total_steps=total_steps,
                          steps_per_epoch=steps_per_epoch, batch_size=config.batch_size)

  # ---------------------------------------------------------------- sharded init
  rules = tuple(tuple(r) for r in (config.get("sharding_rules") or sharding.DEFAULT_RULES))
  params_sharding = sharding.param_shardings(variables_shape["params"], mesh, rules,
                                             fsdp_min_size=int(config.get("fsdp_min_size", 2 ** 14)))

  ema_decay = float(config.get("ema_decay") or 0.0)  # Polyak average of the weights (DeiT / LV-ViT)

  def init_state(rng):
    variables = task.init(rng, dummy)
    params = variables.pop("params")
    state = {"params": params, "extra": variables, "opt_state": tx.init(params), "step": jnp.int32(0),
             "rng": jax.random.key_data(jax.random.fold_in(rng, 1))}
    if ema_decay:
      state["ema"] = jax.tree_util.tree_map(jnp.copy, params)
    return state

  state_shape = jax.eval_shape(init_state, jax.random.key(config.seed))
  state_sharding = sharding.tree_shardings(state_shape, variables_shape["params"], params_sharding, mesh)
  abstract_state = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                          state_shape, state_sharding)

  # ---------------------------------------------------------------- update step
  accumulate = int(config.get("accumulate", 1) or 1)
  per_shard = config.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
  if per_shard % accumulate:
    raise ValueError(f"accumulate={accumulate} must divide the batch of each of the "
                     f"{mesh.shape['data'] * mesh.shape['fsdp']} batch shards ({per_shard}).")

  def grads_of(params, extra, batch, rng, consts):
    (loss, (m, extra)), grads = jax.value_and_grad(task.loss, has_aux=True)(params, extra, batch, rng, consts)
    return loss, m, extra, grads

  train_images = _images_on_device(config.data.get("pp_train"))

  def train_step(state, guard, consts, batch):
    batch = train_images(batch)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    consts = dict(consts, step=state["step"])  # e.g. scheduled sampling's decay
    params, extra = state["params"], state["extra"]
    if accumulate == 1:
      loss, m, extra, grads = grads_of(params, extra, batch, rng, consts)
    else:  # micro-batches in sequence: activation memory of one micro-batch, same update
      # Micro-batch i takes rows i::accumulate, so every device keeps working on its own rows.
      micro = jax.tree_util.tree_map(lambda a: a.reshape(-1, accumulate, *a.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        extra, acc = carry
        mb, i = xs
        loss, m, extra, g = grads_of(params, extra, mb, jax.random.fold_in(rng, i), consts)
        acc = jax.tree_util.tree_map(lambda a, b: a + b / accumulate, acc, (loss, m, g))
        return (extra, acc), None
      zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(grads_of, params, extra, jax.tree_util.tree_map(
          lambda a: a[0], micro), rng, consts))
      zeros = (zeros[0], zeros[1], zeros[3])
      (extra, (loss, m, grads)), _ = jax.lax.scan(body, (extra, zeros), (micro, jnp.arange(accumulate)))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    m = dict(m, **{"train/loss": loss, "train/lr": lr_fn(state["step"]),
                   "train/grad_norm": optax.tree.norm(grads)})
    new_state = {"params": params, "extra": extra, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": state["rng"]}
    if ema_decay:
      new_state["ema"] = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], params)
    # The NaN guard stays on the device: the first step whose loss is not finite, and that loss.
    first = (guard["step"] == 0) & ~jnp.isfinite(loss)
    guard = {"step": jnp.where(first, new_state["step"], guard["step"]),
             "loss": jnp.where(first, loss.astype(jnp.float32), guard["loss"])}
    return new_state, guard, m

  replicated = jax.NamedSharding(mesh, jax.P())
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jax.jit(train_step, in_shardings=(state_sharding, replicated, replicated, batch_sharding),
                    out_shardings=(state_sharding, replicated, replicated), donate_argnums=(0, 1))

  return Program(task, dummy, (h, w, channels), tx, lr_fn, ema_decay, init_state, params_sharding,
                 state_sharding, abstract_state, replicated, batch_sharding, step_fn)


def lower_train_step(config, mesh, num_classes: int, batch: Mapping[str, Any], info=None):
  """The update step of `config` on `mesh` for a global `batch` of these shapes, lowered (`.compile()`
  gives the program XLA runs, `.as_text()` its HLO): to inspect its collectives, memory and FLOPs."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
    program = build_program(config, mesh, num_classes, info, total_steps=100, steps_per_epoch=10.0)
    put = lambda a, sh: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=sh)
    guard = {"step": put(np.int32(0), program.replicated), "loss": put(np.float32(0), program.replicated)}
    constants = jax.tree_util.tree_map(lambda a: put(a, program.replicated), program.task.constants)
    batch = jax.tree_util.tree_map(lambda a: put(a, program.batch_sharding), dict(batch))
    return program.step_fn.lower(program.abstract_state, guard, constants, batch)


def _train(config, workdir: epath.Path, mesh) -> dict[str, float]:
  is_main = jax.process_index() == 0

  # ---------------------------------------------------------------- input
  # Every process reads the rows of each global batch that its devices hold (BatchPlacement);
  # the global batches themselves do not depend on the number of processes or devices.
  global_batch = config.batch_size
  placement = sharding.BatchPlacement(mesh, global_batch)
  local_batch = len(placement.rows)
  text_options = config.data.get("text")
  text_options = text_options.to_dict() if hasattr(text_options, "to_dict") else text_options
  images = dict(channels=(config.get("model") or {}).get("channels", 3),
                skip_unreadable=bool(config.data.get("skip_unreadable", False)))  # image folders
  train_source = input_pipeline.get_source(config.data.name, config.data.train_split, config.data.data_dir,
                                           text_options, **images)
  if config.data.get("score_maps"):  # token labeling: each example carries its teacher score map
    train_source = input_pipeline.Source(
        score_maps.ScoreMapSource(train_source.data, config.data.score_maps, dataset=config.data.name,
                                  split=config.data.train_split), train_source.num_classes, train_source.name)
  eval_source = input_pipeline.get_source(config.data.name, config.data.eval_split, config.data.data_dir,
                                          text_options, **images)
  steps_per_epoch = len(train_source) / global_batch
  total_steps = optim.to_steps(config, "total", steps_per_epoch=steps_per_epoch, batch_size=global_batch)
  log_every = optim.to_steps(config, "log", steps_per_epoch=steps_per_epoch, batch_size=global_batch, default=50)
  eval_every = optim.to_steps(config, "eval", steps_per_epoch=steps_per_epoch, batch_size=global_batch,
                              default=total_steps)
  ckpt_every = optim.to_steps(config, "checkpoint", steps_per_epoch=steps_per_epoch, batch_size=global_batch,
                              default=total_steps)
  make_train_data = lambda start: input_pipeline.train_dataset(
      train_source, config.data.pp_train, global_batch, seed=config.seed, rows=placement.rows, start=start,
      repeated_augmentation=int(config.data.get("repeated_augmentation", 1) or 1),
      workers=int(config.data.get("workers", 0) or 0), on_device=True)

  # ---------------------------------------------------------------- model, optimizer, update step
  program = build_program(config, mesh, train_source.num_classes, train_source.info, total_steps=total_steps,
                          steps_per_epoch=steps_per_epoch)
  task, dummy, (h, w, channels) = program.task, program.dummy, program.image_shape
  params_sharding, state_sharding = program.params_sharding, program.state_sharding
  abstract_state, step_fn, ema_decay = program.abstract_state, program.step_fn, program.ema_decay
  replicated, batch_sharding = program.replicated, program.batch_sharding

  # ---------------------------------------------------------------- resume / init
  eval_global_batch = int(config.get("eval_batch_size") or global_batch)
  eval_placement = sharding.BatchPlacement(mesh, eval_global_batch)

  ckpt = resume.Checkpointer(workdir, keep=config.keep_checkpoints, keep_every=config.get("keep_every_steps"))
  saved_config = {"task": config.get("task", "classification"), "model": settings_to_json(task.settings)}
  saved_config.update(task.saved_config() if hasattr(task, "saved_config") else {"image_size": [h, w]})
  run_config = json.loads(json.dumps(_config_dict(config), default=str))  # as config.json holds it
  previous = _read_json(workdir / "config.json")
  changes = config_changes(previous, run_config) if previous is not None else []
  restored = ckpt.restore_latest(abstract_state, changes=", ".join(changes))
  if restored is not None:
    first_step, state, data_state = restored
    saved_batch = data_state.get("batch_size", global_batch)
    if saved_batch != global_batch:
      raise ValueError(f"{ckpt.directory} was trained with batch_size={saved_batch}, not {global_batch}: its data "
                       "position is in those batches. Resume with the same batch_size, or start a new workdir "
                       "with config.init.path pointing at the checkpoint.")
    if is_main:
      print(f"resumed from step {first_step} in {ckpt.directory}", flush=True)
      if changes:
        print("config changes since the saved run: " + "; ".join(changes), flush=True)
  else:
    first_step = 0
    state = jax.jit(program.init_state, out_shardings=state_sharding)(jax.random.key(config.seed))
    if config.init.get("path"):
      state = _load_init(config, state, state_sharding)
  train_iter = iter(make_train_data(first_step))  # global batch j is the data of step j + 1
  if first_step < total_steps:  # the first batch's shapes, checked before anything is written
    first_batch = next(train_iter)
    if h is None:
      _check_arrays(first_batch, {k: local_batch for k in dummy})  # lengths vary (length buckets)
    else:
      _check_batch(first_batch, (local_batch, h, w, channels))
    train_iter = itertools.chain([first_batch], train_iter)
  if is_main:  # only now: a run that fails to start leaves the previous run's config.json in place
    files.write_atomic(workdir / "config.json", json.dumps(run_config, indent=2))

  # ---------------------------------------------------------------- evaluation step
  constants = jax.device_put(task.constants, replicated)  # e.g. a teacher, replicated

  eval_images = _images_on_device(config.data.get("pp_eval"))

  def eval_step(params, extra, batch, sums):
    """One evaluation batch added to the running sums; returns (sums, per-example outputs).

    The sums chain the batches' programs: programs that do not depend on each other may run at the
    same time, and across processes their collectives could then meet in a different order on each
    process and hang.
    """
    out = task.evaluate({"params": params, **extra}, eval_images(batch))
    per_example = {k: out.pop(k) for k in list(out) if k.startswith("_")}
    return jax.tree_util.tree_map(jnp.add, sums, out), per_example

  eval_fn = jax.jit(eval_step, in_shardings=(params_sharding, state_sharding["extra"], batch_sharding, replicated),
                    out_shardings=replicated, donate_argnums=(3,))

  # ---------------------------------------------------------------- evaluation

  def evaluate(state) -> dict[str, float]:
    """eval/<metric>, and eval_ema/<metric> for the weight average when config.ema_decay is set."""
    metrics = evaluate_params(state["params"], state["extra"], "eval")
    if ema_decay:
      metrics.update(evaluate_params(state["ema"], state["extra"], "eval_ema"))
    return metrics

  def evaluate_params(params, extra, prefix: str) -> dict[str, float]:
    sums, arrays = None, {}
    batches = input_pipeline.eval_batches(eval_source, config.data.pp_eval, eval_global_batch, on_device=True,
                                          rows=eval_placement.rows)
    for k, batch in enumerate(batches):
      batch = eval_placement.put(batch)
      if sums is None:  # zeros shaped like the task's sums
        shapes = jax.eval_shape(lambda p, e, b: task.evaluate({"params": p, **e}, eval_images(b)),
                                params, extra, batch)
        sums = multihost.from_host({name: np.zeros(v.shape, v.dtype) for name, v in shapes.items()
                                    if not name.startswith("_")}, replicated)
      sums, per_example = eval_fn(params, extra, batch, sums)
      if per_example:  # replicated outputs in global row order: keep the real examples (the first n rows)
        keep = np.arange(k * eval_global_batch, (k + 1) * eval_global_batch) < len(eval_source)
        for name, v in jax.device_get(per_example).items():
          arrays.setdefault(name, []).append(np.asarray(v)[keep])
    sums = jax.device_get(sums)
    count = float(sums["count"])
    if count != len(eval_source):
      raise AssertionError(f"Evaluated {count} examples of {len(eval_source)}.")
    metrics = {k: float(v) / count for k, v in sums.items() if k != "count"}
    if arrays:
      metrics.update(task.summarize({k: np.concatenate(v) for k, v in arrays.items()}))
    return {f"{prefix}/{k}": v for k, v in sorted(metrics.items())}

  # ---------------------------------------------------------------- loop
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=first_step)
  progress = metrics_lib.Progress(total_steps, first_step, enabled=is_main)
  final: dict[str, float] = {}
  # Nothing in the loop waits for the device except logging, saving and evaluation: the loss is
  # checked through the guard there, so nothing non-finite is ever saved or reported as a result.
  guard = multihost.from_host({"step": np.int32(0), "loss": np.float32(0)}, replicated)
  tic, seen = time.perf_counter(), 0
  data_state = lambda step: {"batches": step, "batch_size": global_batch, "seed": int(config.seed)}
  preemption = multihost.PreemptionWatch()
  try:
    for step in range(first_step + 1, total_steps + 1):
      batch = next(train_iter)
      state, guard, m = step_fn(state, guard, constants, placement.put(batch))
      seen += global_batch
      if step % log_every == 0 or step == total_steps:
        _check_guard(guard)
        m = jax.device_get(m)
        toc = time.perf_counter()
        m[f"perf/{getattr(task, 'unit', 'img')}_per_sec"] = seen / (toc - tic)
        tic, seen = toc, 0
        writer.write(step, m)
        progress.update(step, m)
      preempted = preemption.reached(step, in_flight=state)  # every process answers True at the same step
      if step % ckpt_every == 0 or step == total_steps or preempted:
        _check_guard(guard)
        ckpt.save(step, state, data_state(step), saved_config)
      if preempted:
        ckpt.wait()
        if is_main:
          print(f"preempted: saved step {step} in {ckpt.directory}; rerun the same command to resume", flush=True)
        raise Preempted(step)
      if step % eval_every == 0 or step == total_steps:
        _check_guard(guard)
        final = evaluate(state)
        writer.write(step, final)
        if is_main:
          print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()), flush=True)
    if first_step >= total_steps:
      final = evaluate(state)
  finally:
    preemption.close()
    ckpt.close()
    writer.close()
  return final


def _check_guard(guard) -> None:
  """Raises when the device-side guard recorded a non-finite loss (this waits for the step)."""
  guard = jax.device_get(guard)
  step, loss = int(guard["step"]), float(guard["loss"])
  if step:
    raise NonFiniteLossError(f"The training loss is {loss} at step {step}: stopping without saving. The last good "
                             "checkpoint is kept; lower the learning rate or enable clip_norm, then rerun to resume.")


def _images_on_device(pp: str | None):
  """The input pipeline leaves a final `value_range` to the device (images travel as uint8): this
  applies it to a batch inside the jitted step, the same float32 values the host would give."""
  op = preprocess.split_device(pp)[1] if pp else None
  if op is None:
    return lambda batch: batch
  return lambda batch: dict(batch, image=op(batch["image"])) if "image" in batch else batch


def _check_batch(batch: Mapping[str, np.ndarray], expected: tuple[int, ...]) -> None:
  got = tuple(batch["image"].shape)
  if got != expected:
    raise ValueError(f"The input pipeline gives images of shape {got} but the model expects {expected} "
                     "(batch, height, width, channels): fix config.data.image_size / pp_train or the model's "
                     "channels.")


def _check_arrays(batch: Mapping[str, np.ndarray], expected: Mapping[str, int]) -> None:
  for k, rows in expected.items():
    if k not in batch or np.shape(batch[k])[:1] != (rows,):
      raise ValueError(f"The input pipeline gives {k!r} of shape {np.shape(batch.get(k))}, not a batch of "
                       f"{rows} rows: check config.batch_size and the dataset.")


def _load_init(config, state, state_sharding):
  """Start from `config.init.path` (our checkpoint or a published .npz): head reset, posemb resized."""
  from vit_jax.interop import load_pretrained_variables

  init = config.init
  h, w = _image_size(config)
  patch = dict(config.model).get("patch_size", 1)  # any family's
  ph, pw = (int(patch), int(patch)) if np.ndim(patch) == 0 else tuple(patch)
  # The fresh variables, whole on every host, are the template (and the new head's initial values);
  # under FSDP over several processes they are gathered first.  Batch statistics come along.
  template = {"params": multihost.to_host(state["params"]), **multihost.to_host(state["extra"])}
  loaded = load_pretrained_variables(init.path, template, dont_load=list(init.get("dont_load") or ()),
                                     reinit_head=bool(init.get("reinit_head", True)),
                                     posemb_resize=init.get("posemb_resize", "vit_jax"), grid=(h // ph, w // pw))
  logging.info("Initialised from %s.", init.path)
  params = multihost.from_host(loaded.pop("params"), state_sharding["params"])
  extra = multihost.from_host(loaded, state_sharding["extra"]) if loaded else state["extra"]
  return dict(state, params=params, extra=extra)
