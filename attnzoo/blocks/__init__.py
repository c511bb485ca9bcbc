"""nn.Modules shared by the backbone families (attention blocks, MLPs, stems, downsamplers).

Import blocks from their modules, e.g. ``from attnzoo.blocks.neighborhood import NeighborhoodAttention2d``.
"""
