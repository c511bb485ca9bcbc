#!/usr/bin/env python3
"""Train a timm/attnzoo classifier: timm train.py's flags plus --config YAML; DDP through torchrun.

    python tools/train.py --config configs/demo/fashion_mnist.yaml
    torchrun --nproc_per_node 8 tools/train.py --config configs/imagenet/nat_tiny.yaml --data-dir /data/imagenet
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attnzoo.training.errors import UsageError  # noqa: E402


def main() -> int:
    from attnzoo.training.loop import main as train

    try:
        train(sys.argv[1:])
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        saved = getattr(e, "checkpoint", None)
        hint = (f"continue with --resume {saved}" if saved else
                "no epoch finished, so there is no checkpoint to resume: run the command again")
        print(f"train.py: interrupted; {hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
