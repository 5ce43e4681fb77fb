"""Writes tiny `.npz` files the way the published checkpoints are laid out.

Deliberately independent of `vit_jax.interop.npz` (its own key table, written
from the format descriptions), so that a loader bug cannot hide behind the
same bug in an exporter.
"""

import numpy as np

# In-memory (Linen) block child -> name in the official vit_jax files (pre-Linen counter).
OFFICIAL_BLOCK_NAMES = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                        "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def vit_jax_file(params, path, *, prefix=""):
  """vit_jax layout: pre-Linen names, posemb (with class row) under posembed_input."""
  flat = {}
  for key, v in _flat(params).items():
    parts = key.split("/")
    if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
      parts[2] = OFFICIAL_BLOCK_NAMES[parts[2]]
    flat[prefix + "/".join(parts)] = v
  np.savez(path, **flat)
  return flat


def big_vision_file(params, path, *, prefix="params/", scanned=False, bfloat16=False):
  """big_vision layout: Linen names, top-level pos_embedding without a class row, optional scan / bf16."""
  import ml_dtypes

  params = {k: v for k, v in params.items()}
  tr = dict(params.pop("Transformer"))
  pe = np.asarray(tr.pop("posembed_input")["pos_embedding"])
  if "cls" in params:  # the class token absorbs its position-embedding row
    params["cls"] = np.asarray(params["cls"]) + pe[:, :1]
    pe = pe[:, 1:]
  params["pos_embedding"] = pe
  if scanned:
    names = sorted((k for k in tr if k.startswith("encoderblock_")), key=lambda k: int(k.split("_")[1]))
    blocks = [_flat(tr.pop(k)) for k in names]
    tr["encoderblock"] = {k: np.stack([b[k] for b in blocks]) for k in blocks[0]}
  params["Transformer"] = tr
  flat = {prefix + k: (v.astype(ml_dtypes.bfloat16) if bfloat16 else v) for k, v in _flat(params).items()}
  np.savez(path, **flat)
  return flat
