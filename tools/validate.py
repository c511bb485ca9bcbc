#!/usr/bin/env python3
"""Top-1/top-5 and loss of a model on an ImageFolder (or a timm dataset) from a training checkpoint or
an official weights file, with the checkpoint's (or the model's pretrained_cfg) preprocessing.

    python tools/validate.py --dataset torch/fashion_mnist --data-dir data --checkpoint output/demo/.../last.pth.tar
    python tools/validate.py /data/imagenet --model nat_tiny --checkpoint nat_tiny.pth
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attnzoo.training.errors import UsageError  # noqa: E402


def main() -> int:
    from attnzoo.training.validate import run

    try:
        run(sys.argv[1:])
    except UsageError as e:
        print(f"validate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
