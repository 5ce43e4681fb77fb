"""Convert a checkpoint between formats.

    python -m vit_jax.interop.convert --input ViT-B_16.npz --to hf --output out/vit-b16-hf
    python -m vit_jax.interop.convert --input WORKDIR --to timm --output out/timm
    python -m vit_jax.interop.convert --input WORKDIR --to vit_jax_npz --output out/model.npz

--input: a native checkpoint (a trainer work directory, a checkpoint root or one
step directory), an `.npz` in the vit_jax or big_vision layout, or PyTorch weights
read without torch: a `.pth` / `.bin` / `.safetensors` file (timm, DeiT, MAE or
LV-ViT names), or a Hugging Face / timm folder (config.json + weights).
--to:
  vit_jax_npz     the official vit_jax layout (timm's `load_pretrained` reads it)
  big_vision_npz  big_vision's layout (`params/` prefix; --scan stacks the blocks)
  timm            a directory: model.safetensors + config.json ("local-dir:" for timm.create_model)
  hf              a directory: model.safetensors + config.json for transformers' from_pretrained
  orbax           a native checkpoint directory (e.g. to start training from a published file)

The model settings come from the checkpoint's saved config, or are read from
the weights of an `.npz`; `--config` adds or overrides settings, as a JSON
file, a JSON object, or `key=value,...` (`variant=B/16` expands to the size).
Before writing, the weights are checked against the model those settings
build, so a wrong setting fails here and not in PyTorch.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

FORMATS = ("vit_jax_npz", "big_vision_npz", "timm", "hf", "orbax")


def parse_config(spec: str | None) -> dict[str, Any]:
  """`--config`: a JSON file, a JSON object, or `key=value,...` (values as Python literals)."""
  if not spec:
    return {}
  if os.path.isfile(spec):
    with open(spec) as f:
      spec = f.read()
  spec = spec.strip()
  if spec.startswith("{"):
    try:
      out = json.loads(spec)
    except json.JSONDecodeError as e:
      raise ValueError(f"--config is not valid JSON: {e}.") from None
  else:
    out = {}
    for item in _split(spec):
      key, sep, value = item.partition("=")
      if not sep:
        raise ValueError(f"--config item {item!r} is not key=value.")
      try:
        out[key.strip()] = ast.literal_eval(value.strip())
      except (ValueError, SyntaxError):
        out[key.strip()] = value.strip()  # a bare string such as gelu or B/16
  model = dict(out.pop("model", {}), **out)
  if "variant" in model:
    from vit_jax.models.variants import decode_variant
    model = dict(decode_variant(model.pop("variant")), **model)
  return model


def _split(spec: str) -> list[str]:
  """Split on commas outside brackets: `patch_size=(16, 8),width=64`."""
  items, depth, cur = [], 0, ""
  for ch in spec:
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      items.append(cur)
      cur = ""
    else:
      cur += ch
  return [i for i in items + [cur] if i.strip()]


def _image_size(value: str | None):
  if not value:
    return None
  try:
    parts = [int(v) for v in value.replace("x", ",").split(",")]
  except ValueError:
    raise ValueError(f"--image_size {value!r} is not H or H,W in pixels (e.g. 224 or 384,192).") from None
  if len(parts) > 2 or min(parts) < 1:
    raise ValueError(f"--image_size {value!r} is not H or H,W in pixels (e.g. 224 or 384,192).")
  return (parts[0], parts[0]) if len(parts) == 1 else tuple(parts)


def check_against_model(params, settings, grid, *, mae: bool = False) -> None:
  """Raise a listing of every key/shape that differs from what `settings` builds (a
  `VisionTransformer`, or with `mae` a `MaskedAutoencoder`)."""
  import jax
  import jax.numpy as jnp

  from vit_jax.interop.tree import ParamMismatchError, diff_params
  from vit_jax.models.mae import MaskedAutoencoder
  from vit_jax.models.vit import VisionTransformer

  if mae:
    model, (ph, pw) = MaskedAutoencoder(**settings), (settings["patch_size"],) * 2
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
  else:
    model, (ph, pw), rngs = VisionTransformer(**settings), settings["patch_size"], jax.random.key(0)
  images = jnp.zeros((1, grid[0] * ph, grid[1] * pw, settings.get("channels", 3)))
  shapes = jax.eval_shape(lambda: model.init(rngs, images))["params"]
  diff = diff_params(params, shapes)
  if diff:
    shown = ("width", "depth", "num_heads", "mlp_dim", "patch_size") + (
        ("decoder_width", "decoder_depth") if mae else ("pool_type", "num_classes"))
    raise ParamMismatchError("The weights do not match the model settings "
                             f"{ {k: settings.get(k) for k in shown} }:\n"
                             f"{diff.describe()}\nFix the settings with --config (the image size with --image_size).")


HINTS = ("num_heads", "residual_scale", "decoder_heads", "norm_pix_loss")  # settings the weights may not show


def convert(input_path: str, to: str, output: str, *, config: dict[str, Any] | None = None,
            image_size=None, scan: bool = False, labels: Sequence[str] | None = None,
            overwrite: bool = False) -> str:
  """Convert `input_path` to format `to` at `output`; returns a one-line summary.

  The output is written whole or not at all (files and folders under a temporary name, then
  renamed); an existing output is an error unless `overwrite`.
  """
  from vit_jax.interop import common, load, npz

  if to not in FORMATS:
    raise ValueError(f"Unknown target format {to!r}: choose one of {FORMATS}.")
  from vit_jax import files

  files.check_output(output, input_path, overwrite=overwrite)
  hints = dict({k: (config or {}).get(k) for k in HINTS}, image_size=image_size)
  variables, saved = load.load_variables(input_path, hints=hints)
  params = variables.pop("params")
  if image_size is None and saved.get("image_size"):
    image_size = tuple(saved["image_size"])
  if (saved.get("model") or {}).get("family") in ("swin", "cait"):
    return _convert_family(params, dict(saved["model"], **(config or {})), to, output, input_path=input_path,
                           image_size=image_size, labels=labels, overwrite=overwrite)
  if saved.get("task") == "mae":
    return _convert_mae(params, dict(saved["model"], **(config or {})), to, output, input_path=input_path,
                        image_size=image_size, scan=scan, overwrite=overwrite)
  settings = common.model_settings(dict(saved.get("model", {}), **(config or {})))
  # The grid from the image size alone first, so that wrong settings show up as a key diff.
  grid = common.grid_of(settings, image_size) if image_size else common.patch_grid(params, settings)
  check_against_model(params, dict(settings, scan=False), grid)
  if variables and to != "orbax":
    raise ValueError(f"The model keeps {sorted(variables)} besides its parameters (the conv stem's BatchNorm "
                     f"statistics), which {to} cannot hold: convert it to orbax.")

  if to in ("vit_jax_npz", "big_vision_npz"):  # one file, written atomically
    layout = to[:-len("_npz")]
    npz.save_npz(output, params, layout=layout, scan=scan and layout == "big_vision", settings=settings,
                 image_size=image_size)
    how = (f"timm: model.load_pretrained({output!r}); " if layout == "vit_jax" else "") + \
        f"vit_jax: load_pretrained({output!r}, init_params)"
  else:
    how = _write_folder(to, output, params, settings, grid, input_path=input_path, image_size=image_size,
                        scan=scan, labels=labels, overwrite=overwrite, extra=variables)
  return f"wrote {to} to {output}; load it with {how}"


def _convert_family(params, settings, to, output, *, input_path, image_size, labels, overwrite) -> str:
  """A Swin Transformer (to orbax or Hugging Face's Swin(v2)ForImageClassification) or a CaiT (to orbax or
  timm's Cait)."""
  import contextlib

  import jax
  import jax.numpy as jnp

  from vit_jax import checkpoint, files
  from vit_jax.interop import cait, swin
  from vit_jax.interop.tree import ParamMismatchError, diff_params
  from vit_jax.train.tasks import build_classifier

  family = settings["family"]
  name, targets = {"swin": ("A Swin Transformer", ("orbax", "hf")), "cait": ("A CaiT", ("orbax", "timm"))}[family]
  if to not in targets:
    raise ValueError(f"{name} converts to {' or '.join(targets)}, not {to}.")
  if image_size is None:
    raise ValueError(f"The {family} model's image size is unknown: give --image_size.")
  model_settings = {k: v for k, v in settings.items() if k != "family"}
  size = tuple(image_size) if np.ndim(image_size) else (int(image_size),) * 2
  model = build_classifier(settings)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, model.channels))))["params"]
  diff = diff_params(params, shapes)
  if diff:
    raise ParamMismatchError(f"The weights do not match the {family} settings:\n{diff.describe()}\n"
                             "Fix the settings with --config.")
  building = files.atomic_directory(output, overwrite=overwrite) if files.is_local(output) \
      else contextlib.nullcontext(output)
  with building as out:
    if to == "hf":
      swin.save_hf(params, model_settings, out, size, labels)
      cls = swin.hf_config(model_settings, size)["architectures"][0]
      how = f"transformers.{cls}.from_pretrained({output!r})"
    elif to == "timm":
      cait.save_timm(params, model_settings, out, size)
      how = f"timm.create_model('local-dir:{output}', pretrained=True)"
    else:
      checkpoint.save(out, params, config={"model": dict(settings), "image_size": list(size), "source": input_path})
      how = f"vit_jax.checkpoint.load({output!r})"
  return f"wrote {to} to {output}; load it with {how}"


def _convert_mae(params, settings, to, output, *, input_path, image_size, scan, overwrite) -> str:
  """A masked autoencoder with its decoder: to orbax (task "mae") or to Hugging Face's ViTMAEForPreTraining."""
  import contextlib

  from vit_jax import checkpoint, files
  from vit_jax.interop import common, hf_export

  if to not in ("orbax", "hf"):
    raise ValueError(f"{input_path!r} is a masked autoencoder with its decoder, which converts to orbax or hf "
                     f"(ViTMAEForPreTraining), not {to}; fine-tune its encoder with --config.init.path instead.")
  if image_size is None:
    raise ValueError("The MAE's image size is unknown: give --image_size.")
  p = int(settings["patch_size"])
  grid = common.grid_of({"patch_size": (p, p)}, image_size)
  check_against_model(params, dict(settings, scan=False), grid, mae=True)
  building = files.atomic_directory(output, overwrite=overwrite) if files.is_local(output) \
      else contextlib.nullcontext(output)
  with building as out:
    if to == "hf":
      if grid[0] != grid[1]:
        raise ValueError(f"Hugging Face ViTMAE needs a square image, got {image_size}.")
      hf_export.save_mae(params, settings, out, image_size=grid[0] * p)
      how = f"transformers.ViTMAEForPreTraining.from_pretrained({output!r})"
    else:
      checkpoint.save(out, common.scanned(params) if scan else params, config={
          "model": dict(settings, scan=scan), "task": "mae", "image_size": [grid[0] * p, grid[1] * p],
          "source": input_path})
      how = f"vit_jax.checkpoint.load({output!r})"
  return f"wrote {to} to {output}; load it with {how}"


def _write_folder(to, output, params, settings, grid, *, input_path, image_size, scan, labels, overwrite,
                  extra=None) -> str:
  """A folder format, built under a temporary name beside `output` and renamed (object stores: in place)."""
  import contextlib

  from vit_jax import files
  from vit_jax.interop import common, hf_export, timm_export

  building = files.atomic_directory(output, overwrite=overwrite) if files.is_local(output) \
      else contextlib.nullcontext(output)
  with building as out:
    if to == "timm":
      timm_export.save(params, settings, out, image_size=image_size)
      return f"timm.create_model('local-dir:{output}', pretrained=True)"
    if to == "hf":
      hf_export.save(params, settings, out, image_size=image_size, labels=labels)
      _, cls, _ = hf_export.architecture(settings)
      extra = ", add_pooling_layer=False" if cls == "ViTModel" and not settings["representation_size"] else ""
      return f"transformers.{cls}.from_pretrained({output!r}{extra})"
    from vit_jax import checkpoint
    from vit_jax.checkpoint import settings_to_json
    ph, pw = settings["patch_size"]
    tree = common.scanned(params) if scan else params
    checkpoint.save(out, tree, config={"model": settings_to_json(dict(settings, scan=scan)),
                                       "image_size": [grid[0] * ph, grid[1] * pw], "source": input_path},
                    extra=extra)
    return f"vit_jax.checkpoint.load({output!r})"


def main(argv: Sequence[str] | None = None) -> int:
  from vit_jax import cli

  parser = cli.ArgumentParser(prog="python -m vit_jax.interop.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="native checkpoint directory or .npz file")
  parser.add_argument("--to", required=True, choices=FORMATS)
  parser.add_argument("--output", required=True, help="output file (.npz) or directory")
  parser.add_argument("--config", help="model settings: JSON file, JSON object or key=value,...")
  parser.add_argument("--image_size", help="H or H,W: needed for non-square grids without a saved config")
  parser.add_argument("--scan", action="store_true", help="stack the blocks (big_vision_npz, orbax)")
  parser.add_argument("--labels", help="text file with one class name per line (hf id2label)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output (never the input)")
  args = parser.parse_args(argv)

  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; never grab an accelerator
  try:
    labels = None
    if args.labels:
      with open(args.labels) as f:
        labels = [line.strip() for line in f if line.strip()]
    print(convert(args.input, args.to, args.output, config=parse_config(args.config),
                  image_size=_image_size(args.image_size), scan=args.scan, labels=labels, overwrite=args.overwrite))
  except cli.INPUT_ERRORS as e:
    return cli.fail(e, 2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
