"""vit_jax entry point: `python main.py --config configs/<task>.py:<args> --workdir DIR`."""

import sys


def main() -> int:
  print("vit_jax: the trainer is not built yet. The model core is ready: "
        "`python -c \"from configs.models import create_model; print(create_model('Ti/16'))\"`.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
