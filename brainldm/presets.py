"""The paper's constants, in one place.

Takagi & Nishimoto (CVPR 2023) and their reference code (yu-takagi/StableDiffusionReconstruction).
Everything else in brainldm takes these as defaults and never repeats the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SAMPLES = 16  # samples per image that a Sampling may ask for (the paper drew 5)


@dataclass(frozen=True)
class Sampling:
    """How Xc and Xzc are sampled, passed whole from the app and the scripts to :class:`Reconstructor`.

    ``strength``: the img2img noise level (0 keeps Xz, 1 ignores it); ``guidance_scale``: how strongly c steers
    the image (classifier-free guidance, >= 1); ``num_samples``: samples per image, each image's
    sample k from its own noise (``brainldm.torch_utils.noise_seed`` of the seed, the image and k).
    """

    strength: float = 0.8
    guidance_scale: float = 5.0
    num_inference_steps: int = 50
    seed: int = 42
    num_samples: int = 1


@dataclass(frozen=True)
class Preset:
    """A complete set of method constants. ``TAKAGI2023`` is the paper's."""

    # Latent diffusion model
    model_id: str = "CompVis/stable-diffusion-v1-4"
    vae_scaling_factor: float = 0.18215
    # z: the stimulus is resized to this size before VAE encoding (-> 4 x 40 x 40 for SD-1.x)
    z_image_size: int = 320
    # Reconstruction (img2img with DDIM, eta 0): one sample per image by default; the paper's evaluation uses 5
    output_size: int = 512
    sampling: Sampling = Sampling()
    eval_samples: int = 5
    # Decoders: which feature (the LDM's conditioning target) is predicted from which NSD `streams` ROI. Subject
    # maps are keyed by these names, so an LDM with other targets (SDXL's two text embeddings) adds rows here.
    decoders: tuple[tuple[str, str], ...] = (("z", "early"), ("c", "ventral"))
    # The follow-up pipeline (the paper's code, after the CVPR paper): BLIP image embeddings and DPT hidden states,
    # each decoded from six streams together, as reduced-rank maps (dense ones of NSD's ~15,000 voxels would be tens
    # of GB: brainldm.decoding.fit.fit_subject_maps)
    followup_decoders: tuple[tuple[str, str], ...] = (
        ("blip", "early+ventral+midventral+midlateral+lateral+parietal"),
        ("dpt", "early+ventral+midventral+midlateral+lateral+parietal"),
    )
    followup_rank: int = 256
    # Rescaling decoded targets to the training distribution (brainldm.decoding.maps.RESCALE_MODES), as Brain-Diffuser
    # does; the paper generates from the ridge predictions as they are
    rescale: str | None = None
    cv_folds: int = 5
    alphas: tuple[float, ...] = tuple(10.0**k for k in range(-1, 8))
    # Data
    subjects: tuple[int, ...] = (1, 2, 5, 7)
    # Encoding
    n_pca: int = 6400
    fdr_q: float = 0.05


TAKAGI2023 = Preset()
