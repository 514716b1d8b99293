"""The test-set reconstruction job and its folders: decoded features in, one folder of reconstructions per trial out.

It stands on ``ldm`` (the Reconstructor) and ``decoding`` (the maps it is given), and under ``analysis``, which scores
and draws what it writes.
"""
