"""Image GPT to and from Hugging Face's `ImageGPTForCausalImageModeling` (the `openai/imagegpt-*` layout).

| ours | Hugging Face |
|---|---|
| `wte/embedding` [V + 1, D] (row V: the SOS) | `transformer.wte.weight` |
| `wpe/embedding` | `transformer.wpe.weight` |
| `Transformer/encoderblock_{i}/LayerNorm_0/scale`, `LayerNorm_1/scale` | `transformer.h.{i}.ln_1.weight`, `ln_2.weight` |
| `.../MultiHeadDotProductAttention_0/{query, key, value}` | `transformer.h.{i}.attn.c_attn` (columns q, k, v) |
| `.../MultiHeadDotProductAttention_0/out` | `transformer.h.{i}.attn.c_proj` |
| `.../MlpBlock_0/Dense_0`, `Dense_1` | `transformer.h.{i}.mlp.c_fc`, `mlp.c_proj` |
| `Transformer/encoder_norm/scale` | `transformer.ln_f.weight` |
| `lm_head/kernel` [D, V] | `lm_head.weight` [V, D] |

Hugging Face's `Conv1D` stores `[in, out]` as flax does, so only `lm_head` (a `Linear`) is transposed.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vit_jax.interop import common
from vit_jax.interop.common import contiguous, dataclass_settings


def settings_of(settings: Mapping[str, Any]) -> dict[str, Any]:
  """`ImageGPT` settings with defaults filled in (no `family`)."""
  from vit_jax.models.igpt import ImageGPT

  return dataclass_settings(ImageGPT, settings, "ImageGPT", ignore=("family", "channels"))  # channels: the palette's


HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def hf_config(settings: Mapping[str, Any]) -> dict[str, Any]:
  """`config.json` of `ImageGPTForCausalImageModeling` for these settings."""
  s = settings_of(settings)
  common.require(s, "Hugging Face ImageGPT", activation=tuple(HF_ACT))
  return dict(
      model_type="imagegpt", architectures=["ImageGPTForCausalImageModeling"], vocab_size=int(s["vocab_size"]) + 1,
      n_positions=int(s["num_positions"]), n_embd=int(s["width"]), n_layer=int(s["depth"]),
      n_head=int(s["num_heads"]), n_inner=None if s["mlp_dim"] in (None, 4 * s["width"]) else int(s["mlp_dim"]),
      activation_function=HF_ACT[s["activation"]], layer_norm_epsilon=float(s["layer_norm_eps"]), resid_pdrop=0.0,
      embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
      reorder_and_upcast_attn=False, tie_word_embeddings=False, initializer_range=0.02, dtype="float32")


def hf_state_dict(params: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our `ImageGPT` tree -> `ImageGPTForCausalImageModeling` state dict (float32)."""
  p = common.unrolled(params)
  flat2 = lambda k: np.asarray(k).reshape(np.shape(k)[0], -1) if np.ndim(k) == 3 else np.asarray(k)
  sd = {"transformer.wte.weight": contiguous(p["wte"]["embedding"]),
        "transformer.wpe.weight": contiguous(p["wpe"]["embedding"])}
  for i, blk in enumerate(common.blocks(p)):
    pre, mha, mlp = f"transformer.h.{i}", blk["MultiHeadDotProductAttention_0"], blk["MlpBlock_0"]
    sd[f"{pre}.ln_1.weight"] = contiguous(blk["LayerNorm_0"]["scale"])
    sd[f"{pre}.ln_2.weight"] = contiguous(blk["LayerNorm_1"]["scale"])
    sd[f"{pre}.attn.c_attn.weight"] = contiguous(np.concatenate([flat2(mha[n]["kernel"]) for n in
                                                                 ("query", "key", "value")], axis=1))
    sd[f"{pre}.attn.c_attn.bias"] = contiguous(np.concatenate([np.asarray(mha[n]["bias"]).reshape(-1) for n in
                                                               ("query", "key", "value")]))
    out = np.asarray(mha["out"]["kernel"])
    sd[f"{pre}.attn.c_proj.weight"] = contiguous(out.reshape(-1, out.shape[-1]))
    sd[f"{pre}.attn.c_proj.bias"] = contiguous(mha["out"]["bias"])
    for ours, theirs in (("Dense_0", "c_fc"), ("Dense_1", "c_proj")):
      sd[f"{pre}.mlp.{theirs}.weight"] = contiguous(mlp[ours]["kernel"])
      sd[f"{pre}.mlp.{theirs}.bias"] = contiguous(mlp[ours]["bias"])
  sd["transformer.ln_f.weight"] = contiguous(p["Transformer"]["encoder_norm"]["scale"])
  sd["lm_head.weight"] = contiguous(np.asarray(p["lm_head"]["kernel"]).T)
  return sd


def save_hf(params: Mapping[str, Any], settings: Mapping[str, Any], out_dir) -> str:
  """Write a folder `ImageGPTForCausalImageModeling.from_pretrained` reads; returns out_dir."""
  return common.write_folder(out_dir, hf_state_dict(params, settings), hf_config(settings))


def settings_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
  acts = {v: k for k, v in HF_ACT.items()}
  if config.get("activation_function", "quick_gelu") not in acts:
    raise ValueError(f"ImageGPT activation {config.get('activation_function')!r} is not one this package has.")
  width = int(config["n_embd"])
  return dict(vocab_size=int(config["vocab_size"]) - 1, num_positions=int(config["n_positions"]), width=width,
              depth=int(config["n_layer"]), num_heads=int(config["n_head"]),
              mlp_dim=int(config.get("n_inner") or 4 * width),
              activation=acts[config.get("activation_function", "quick_gelu")],
              layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)))


def from_hf(sd: Mapping[str, np.ndarray], config: Mapping[str, Any], *,
            what: str = "Hugging Face ImageGPT state dict") -> tuple[dict[str, Any], dict[str, Any]]:
  """`(params, settings)` from an `ImageGPTForCausalImageModeling` state dict and its config (the traced
  inverse of `hf_state_dict`); the settings carry `family="igpt"`."""
  import jax
  import jax.numpy as jnp

  from vit_jax.interop.torch_import import import_state_dict
  from vit_jax.interop.tree import flatten
  from vit_jax.models.igpt import ImageGPT

  settings = settings_from_hf(config)
  model = ImageGPT(**settings)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  shapes = {k: tuple(v.shape) for k, v in flatten(shapes).items()}
  params = import_state_dict(dict(sd), lambda p: hf_state_dict(p, settings), shapes, what=what,
                             ignore=r"(attn\.bias|attn\.masked_bias)$")
  return params, dict(settings, family="igpt")
