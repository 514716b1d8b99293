"""The paper's constants, in one place.

Takagi & Nishimoto (CVPR 2023) and their reference code (yu-takagi/StableDiffusionReconstruction).
Everything else in brainldm takes these as defaults and never repeats the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A complete set of method constants. ``TAKAGI2023`` is the paper's."""

    # Latent diffusion model
    model_id: str = "CompVis/stable-diffusion-v1-4"
    vae_scaling_factor: float = 0.18215
    # z: the stimulus is resized to this size before VAE encoding (-> 4 x 40 x 40 for SD-1.x)
    z_image_size: int = 320
    # Reconstruction (img2img)
    output_size: int = 512
    num_inference_steps: int = 50
    strength: float = 0.8
    guidance_scale: float = 5.0
    eta: float = 0.0
    seed: int = 42
    num_samples: int = 5
    # Decoders: which NSD `streams` ROI predicts which feature
    z_roi: str = "early"
    c_roi: str = "ventral"
    cv_folds: int = 5
    alphas: tuple[float, ...] = tuple(10.0**k for k in range(-1, 8))
    # Data
    subjects: tuple[int, ...] = (1, 2, 5, 7)
    n_sessions: int = 37
    # Encoding
    n_pca: int = 6400
    fdr_q: float = 0.05


TAKAGI2023 = Preset()
