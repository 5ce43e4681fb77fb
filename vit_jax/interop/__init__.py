"""Checkpoint interop: published `.npz` files in, timm / Hugging Face / `.npz` out.

    from vit_jax.interop import load_pretrained, npz, timm_export, hf_export

    params = load_pretrained("ViT-B_16.npz", init_params, reinit_head=True)
    npz.save_npz("model.npz", params)                       # vit_jax layout (timm reads it)
    timm_export.save(params, settings, "out/timm")          # timm.create_model("local-dir:out/timm")
    hf_export.save(params, settings, "out/hf")              # ViTForImageClassification.from_pretrained

The package only needs numpy and safetensors for this: it never imports torch.
`python -m vit_jax.interop.convert` is the command-line front end.
"""

from vit_jax.interop.load import adapt_posemb, load_params, load_pretrained, load_pretrained_variables, load_variables
from vit_jax.interop.posemb import resize_posemb
from vit_jax.interop.tree import CheckpointError, ParamMismatchError, diff_params, merge_params

__all__ = ["adapt_posemb", "load_params", "load_pretrained", "load_pretrained_variables", "load_variables",
           "resize_posemb", "CheckpointError",
           "ParamMismatchError", "diff_params", "merge_params"]
