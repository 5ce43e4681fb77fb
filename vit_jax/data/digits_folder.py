"""Write the bundled digits as an image folder, to try `dataset=folder:PATH` without data.

    python -m vit_jax.data.digits_folder workdirs/digits_png
    python main.py --config configs/vit.py:dataset=folder:workdirs/digits_png --workdir workdirs/digits_folder

The folder is `{train,test}/<digit>/<index>.png` (8x8 grey PNGs, the fixed 1437 / 360 split).
"""

from __future__ import annotations

import argparse
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m vit_jax.data.digits_folder", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("folder", help="write the digits here as {train,test}/<digit>/*.png")
  parser.add_argument("--data_dir", help="the TFDS data directory (default: TFDS's)")
  args = parser.parse_args(argv)
  from vit_jax.data import digits
  counts = digits.write_folder(args.folder, args.data_dir)
  print(f"wrote {counts['train']} training and {counts['test']} test digits to {args.folder}/{{train,test}}/<digit>/")


if __name__ == "__main__":
  main()
