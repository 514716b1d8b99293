"""What the paper measures: the metrics table of the reconstructions, voxel-wise encoding models, cortical surfaces
and figures. Stands on ``data``, ``ldm``, ``decoding`` and ``reconstruction``."""
