"""OpenMMLab adapter (optional ``dense`` extra): attnzoo backbones for mmdetection 3.x and mmsegmentation 1.x.

Importing this package registers ``AttnZooBackbone`` in mmdet's and mmseg's ``MODELS`` registries (where
installed); configs do it with ``custom_imports = dict(imports=["attnzoo.openmmlab"])``. Classification
users never import it.
"""
import importlib.util

from attnzoo.openmmlab.backbone import AttnZooBackbone

for _registry_module in ("mmdet.registry", "mmseg.registry"):
    if importlib.util.find_spec(_registry_module.split(".")[0]) is not None:
        importlib.import_module(_registry_module).MODELS.register_module(module=AttnZooBackbone, force=True)

__all__ = ["AttnZooBackbone"]
