"""The LDM side: loading Stable Diffusion (or a model the registry builds), its features of a picture,
the follow-up's captioner and depth model, and :class:`~brainldm.ldm.reconstruct.Reconstructor`, the paper's
method from (z, c) to Xz, Xc and Xzc. Imports the ground floor and ``data``; never ``decoding``."""
