"""Training and evaluation behind tools/train.py and tools/validate.py, built on timm's components."""
from attnzoo.training.errors import UsageError

__all__ = ["UsageError"]
