"""What the paper measures: the test-set reconstruction job and its folders, the metrics table, voxel-wise
encoding models, cortical surfaces and figures. Stands on ``data``, ``ldm`` and ``decoding``."""
