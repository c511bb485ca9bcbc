"""Backbone families, one module each; importing a module registers its models with timm.

Add a family here only once its module imports cleanly.
"""
from attnzoo.backbones import biformer  # noqa: F401
from attnzoo.backbones import davit  # noqa: F401
from attnzoo.backbones import focalnet  # noqa: F401
from attnzoo.backbones import agent_deit, agent_pvt, agent_swin  # noqa: F401
from attnzoo.backbones import maxvit  # noqa: F401
from attnzoo.backbones import nat, dinat  # noqa: F401
