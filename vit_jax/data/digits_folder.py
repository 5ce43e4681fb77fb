"""Write the bundled digits as an image folder, to try `dataset=folder:PATH` without data.

    python -m vit_jax.data.digits_folder workdirs/digits_png
    python main.py --config configs/vit.py:dataset=folder:workdirs/digits_png --workdir workdirs/digits_folder

The folder is `{train,test}/<digit>/<index>.png` (8x8 grey PNGs, the fixed 1437 / 360 split).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
  from vit_jax import cli, files

  parser = cli.ArgumentParser(prog="python -m vit_jax.data.digits_folder", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("folder", help="write the digits here as {train,test}/<digit>/*.png")
  parser.add_argument("--data_dir", help="the TFDS data directory (default: TFDS's)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
  args = parser.parse_args(argv)
  from vit_jax.data import digits
  try:
    with files.atomic_directory(args.folder, overwrite=args.overwrite) as tmp:  # whole, or not at all
      counts = digits.write_folder(tmp, args.data_dir)
  except cli.INPUT_ERRORS as e:
    return cli.fail(e)
  print(f"wrote {counts['train']} training and {counts['test']} test digits to {args.folder}/{{train,test}}/<digit>/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
