"""brainldm: reconstruct seen images from fMRI with latent diffusion (Takagi & Nishimoto, CVPR 2023)."""

__version__ = "0.1.0"
