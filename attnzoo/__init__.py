"""attnzoo: attention vision backbones for timm, on fused Triton kernels.

Importing the package registers every attnzoo model with timm, so ``timm.create_model("nat_tiny")``
works afterwards.
"""
__version__ = "0.1.0"

from attnzoo import backbones  # noqa: F401  (registers the models with timm)
from attnzoo.backbones._registry import list_models

__all__ = ["__version__", "list_models"]
