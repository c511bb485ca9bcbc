"""Backbone families, one module each; importing a module registers its models with timm."""
from attnzoo.backbones import agent_deit, agent_pvt, agent_swin, biformer, davit, dinat, focalnet, maxvit, nat

__all__ = ["agent_deit", "agent_pvt", "agent_swin", "biformer", "davit", "dinat", "focalnet", "maxvit", "nat"]
