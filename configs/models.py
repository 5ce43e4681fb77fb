"""The ViT family by variant string ("Ti/16", "B/16", "DeiT-B-distilled", "LV-ViT-S", ...).

The table and the functions live in the package (`vit_jax/models/variants.py`); configs use them
from here.  `python -m configs.models` prints the model-zoo table of the README.

    >>> cfg = get_config("B/16", num_classes=10)
    >>> model = create_model("B/16", num_classes=10)
"""

from vit_jax.models.variants import (DEIT, LVVIT, SIZES, SWIN, ZOO, count_params, create_model,  # noqa: F401
                                     decode_variant, family_settings, get_config, swin_settings, zoo_table)

if __name__ == "__main__":
  print(zoo_table())
