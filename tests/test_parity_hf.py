"""ViT and DeiT forward passes against Hugging Face transformers (PyTorch) with the same weights.

The torch models are randomly initialised and every parameter is perturbed, the
weights are copied into our parameter tree, and logits must agree to 2e-5 on a
non-square image (float32, exact GELU and LayerNorm eps 1e-6 on both sides).
"""

import jax
import numpy as np
import pytest

from vit_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
TOL = 2e-5
SIZE = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
            image_size=[32, 48], patch_size=8, num_labels=7, layer_norm_eps=1e-6, hidden_act="gelu")


def perturbed(model, seed=0):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def hf_block(sd, prefix, width, heads):
  """One Hugging Face ViT layer (in-memory names under `prefix`) as our encoder block."""
  L = lambda k: sd[prefix + k].detach().numpy()
  dh = width // heads
  qkv = {n: {"kernel": L(f"attention.{hf}_proj.weight").T.reshape(width, heads, dh),
             "bias": L(f"attention.{hf}_proj.bias").reshape(heads, dh)}
         for n, hf in (("query", "q"), ("key", "k"), ("value", "v"))}
  qkv["out"] = {"kernel": L("attention.o_proj.weight").T.reshape(heads, dh, width), "bias": L("attention.o_proj.bias")}
  return {
      "LayerNorm_0": {"scale": L("layernorm_before.weight"), "bias": L("layernorm_before.bias")},
      "MultiHeadDotProductAttention_0": qkv,
      "LayerNorm_1": {"scale": L("layernorm_after.weight"), "bias": L("layernorm_after.bias")},
      "MlpBlock_0": {"Dense_0": {"kernel": L("mlp.fc1.weight").T, "bias": L("mlp.fc1.bias")},
                     "Dense_1": {"kernel": L("mlp.fc2.weight").T, "bias": L("mlp.fc2.bias")}},
  }


def hf_to_ours(sd, prefix, width, heads, depth):
  """Map a Hugging Face ViT/DeiT state dict (in-memory names) to our linen tree."""
  t = lambda k: sd[prefix + k].detach().numpy()
  params = {
      "embedding": {"kernel": t("embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0),
                    "bias": t("embeddings.patch_embeddings.projection.bias")},
      "cls": t("embeddings.cls_token"),
      "Transformer": {"posembed_input": {"pos_embedding": t("embeddings.position_embeddings")},
                      "encoder_norm": {"scale": t("layernorm.weight"), "bias": t("layernorm.bias")}},
  }
  for i in range(depth):
    params["Transformer"][f"encoderblock_{i}"] = hf_block(sd, f"{prefix}layers.{i}.", width, heads)
  return params


def linear(sd, name):
  return {"kernel": sd[name + ".weight"].detach().numpy().T, "bias": sd[name + ".bias"].detach().numpy()}


def ours(**kw):
  return VisionTransformer(num_classes=SIZE["num_labels"], patch_size=SIZE["patch_size"],
                           width=SIZE["hidden_size"], depth=SIZE["num_hidden_layers"],
                           num_heads=SIZE["num_attention_heads"], mlp_dim=SIZE["intermediate_size"],
                           activation="gelu", layer_norm_eps=1e-6, **kw)


def images(seed=1):
  x = np.random.default_rng(seed).standard_normal((3, 32, 48, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("scan", [False, True])
def test_vit_matches_hugging_face(scan):
  ref = perturbed(transformers.ViTForImageClassification(transformers.ViTConfig(**SIZE)))
  sd = ref.state_dict()
  params = hf_to_ours(sd, "vit.", SIZE["hidden_size"], SIZE["num_attention_heads"], SIZE["num_hidden_layers"])
  params["head"] = linear(sd, "classifier")
  if scan:
    from vit_jax.models.encoder import unrolled_to_scan
    params = unrolled_to_scan(params)
  x, xt = images()
  with torch.no_grad():
    want = ref(pixel_values=xt).logits.numpy()
  got, _ = jax.jit(lambda p, x: ours(scan=scan).apply({"params": p}, x))(params, x)
  assert np.max(np.abs(np.asarray(got) - want)) <= TOL
  assert np.std(want) > 0.1  # the comparison is not between near-zero logits


def test_deit_distilled_matches_hugging_face():
  ref = perturbed(transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**SIZE)))
  sd = ref.state_dict()
  params = hf_to_ours(sd, "deit.", SIZE["hidden_size"], SIZE["num_attention_heads"], SIZE["num_hidden_layers"])
  params["dist_token"] = sd["deit.embeddings.distillation_token"].numpy()
  params["head"] = linear(sd, "cls_classifier")
  params["head_dist"] = linear(sd, "distillation_classifier")
  x, xt = images(2)
  with torch.no_grad():
    want = ref(pixel_values=xt)
  got, out = ours(distilled=True).apply({"params": params}, x)
  for ours_v, ref_v in ((got, want.logits), (out["logits_cls"], want.cls_logits),
                        (out["logits_dist"], want.distillation_logits)):
    assert np.max(np.abs(np.asarray(ours_v) - ref_v.numpy())) <= TOL
  assert np.std(want.logits.numpy()) > 0.1
