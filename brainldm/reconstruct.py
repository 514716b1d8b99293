"""Reconstruction: from decoded (z, c) to the paper's three images, Xz, Xc and Xzc.

``Reconstructor(ldm)(z, c)`` reads top to bottom as the method (Takagi & Nishimoto, CVPR 2023, sec. 3.3):

1. Xz: decode z with the VAE (a 320 px image for SD-1.x) and upsample it to the output size (512).
2. Xc: generate from c alone (text-to-image from pure noise), classifier-free guidance against "".
3. Xzc: img2img: re-encode Xz at 512, noise it to ``strength``, DDIM-denoise conditioned on c with guidance.

The follow-up pipeline of the paper's code adds two kinds (:class:`FollowUp`), from the decoded ``blip`` and ``dpt``
targets, when the maps carry them:

4. Xzt: Xzc's img2img from Xz, conditioned on the LDM's text embedding of the caption BLIP writes from the decoded
   image embedding (:mod:`brainldm.captioner`).
5. Xztd: Stable Diffusion 2 depth's img2img from Xz, prompted by that caption and conditioned on the depth map DPT
   draws from the decoded hidden states (:mod:`brainldm.depth`).

Steps 2 and 3 are diffusers' own pipelines (StableDiffusionPipeline / StableDiffusionImg2ImgPipeline) built on
the LDM's components, so the sampler is diffusers', not a re-implementation. Noise is seeded per image and sample
(:func:`noise_seed` of the seed, the image's key such as its ``nsd_id``, and the sample), so each image gets its own
noise, as the paper's code drew every image's from one seeded stream, and an image's reconstruction does not depend
on the batch it ran in. Without keys, sample k of every image is seeded ``seed + k``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from .data import subject_name
from .features import AUXILIARY, empty_prompt_embedding
from .ldm import ldm_sizes
from .presets import TAKAGI2023, Sampling
from .storage import atomic_path
from .validation import MAX_SEED, InputError, check_finite, check_sampling, oneline

KINDS = ("Xz", "Xc", "Xzc", "Xzt", "Xztd")  # every kind of reconstruction, as trial folders name their images


@dataclass
class Reconstruction:
    """Images as uint8 arrays. Xz: (n, H, W, 3); Xc and Xzc: (n, num_samples, H, W, 3)."""

    Xz: np.ndarray
    Xc: np.ndarray
    Xzc: np.ndarray


class Reconstructor:
    """Turns predicted (z, c) into Xz, Xc and Xzc with a Stable Diffusion img2img pipeline's components."""

    def __init__(self, ldm, output_size: int | None = None):
        """``output_size`` defaults to the LDM's own (512 for SD-1.x, see :func:`brainldm.ldm.ldm_sizes`)."""
        self.img2img = ldm
        # the safety checker belongs to public text-to-image serving; reconstructions are research outputs
        components = dict(ldm.components, safety_checker=None, feature_extractor=None)
        self.txt2img = StableDiffusionPipeline(**components, requires_safety_checker=False)
        self.txt2img.set_progress_bar_config(disable=True)
        z_image_size, native_size = ldm_sizes(ldm)
        self.output_size = output_size or native_size
        self.z_image_size = z_image_size

    @property
    def device(self) -> torch.device:
        return self.img2img.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.img2img.unet.dtype

    def check_sampling(self, sampling: Sampling) -> None:
        """The settings alone, before any work: strength, steps (within the scheduler's), guidance, samples, seed."""
        strength, num_inference_steps, num_samples = (
            sampling.strength,
            sampling.num_inference_steps,
            sampling.num_samples,
        )
        if not 0 < strength <= 1:
            raise InputError(f"strength must be in (0, 1], got {strength}")
        check_sampling(self.img2img.scheduler, num_inference_steps, sampling.guidance_scale)
        if num_samples < 1:
            raise InputError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= sampling.seed <= MAX_SEED - (num_samples - 1):
            raise InputError(f"seed must be in 0..2^64-{num_samples} (sample k uses seed + k), got {sampling.seed}")
        if int(num_inference_steps * strength) < 1:
            raise InputError(
                f"strength {strength} x {num_inference_steps} steps runs no denoising step; raise either of them"
            )

    def check_inputs(self, z, c, sampling: Sampling) -> None:
        vae, unet = self.img2img.vae, self.img2img.unet
        if z.ndim != 4 or z.shape[1] != vae.config.latent_channels:
            raise InputError(
                f"z must be (n, {vae.config.latent_channels}, h, w) for this LDM, got {tuple(z.shape)}; "
                "were the maps fitted for another model?"
            )
        expected_c = (self.img2img.tokenizer.model_max_length, unet.config.cross_attention_dim)
        if c.ndim != 3 or tuple(c.shape[1:]) != expected_c:
            raise InputError(
                f"c must be (n, {expected_c[0]}, {expected_c[1]}) for this LDM, got {tuple(c.shape)}; "
                "were the maps fitted for another model?"
            )
        if len(z) != len(c):
            raise InputError(f"z and c hold different numbers of items ({len(z)} and {len(c)})")
        self.check_sampling(sampling)
        check_finite("z", z)
        check_finite("c", c)

    @torch.no_grad()
    def decode_z(self, z: torch.Tensor) -> torch.Tensor:
        """Xz as a tensor in [-1, 1]: the VAE decode of z, upsampled to the output size -> (n, 3, size, size)."""
        vae = self.img2img.vae
        image = vae.decode(z.to(self.device, self.dtype) / vae.config.scaling_factor).sample
        if image.shape[-1] != self.output_size:
            image = F.interpolate(image.float(), size=self.output_size, mode="bicubic", align_corners=False)
        return image.clamp(-1, 1)

    @torch.no_grad()
    def __call__(
        self,
        z: torch.Tensor,
        c: torch.Tensor,
        sampling: Sampling = TAKAGI2023.sampling,
        include_xc: bool = True,
        keys: Sequence[int] | None = None,
    ) -> Reconstruction:
        """Reconstruct n images from z (n, 4, h, w) and c (n, 77, hidden) with the ``sampling`` settings.

        Returns Xz once per image and ``sampling.num_samples`` of Xc and Xzc. ``include_xc=False`` skips Xc (a
        full-length generation) when only Xzc is wanted; Xc is then returned empty. ``keys`` (n,): what tells the
        images apart (their ``nsd_id``), so that each gets its own noise (:func:`noise_seed`); without them every
        image's sample k starts from the same noise (seeded ``seed + k``).
        """
        z, c = torch.as_tensor(z), torch.as_tensor(c)
        self.check_inputs(z, c, sampling)
        n, num_samples = len(z), sampling.num_samples
        if keys is not None and len(keys) != n:
            raise InputError(f"keys must name each of the {n} images, got {len(keys)}")
        seeds = sample_seeds(sampling, n, keys)

        # 1. Xz
        xz = self.decode_z(z)

        # every (image, sample) pair is one item of the diffusion batch; its noise depends on it alone
        xz_items = ((xz + 1) / 2).repeat_interleave(num_samples, dim=0).to(self.dtype)  # diffusers wants [0, 1]
        c_items = c.to(self.device, self.dtype).repeat_interleave(num_samples, dim=0)
        uncond = empty_prompt_embedding(self.img2img).to(self.device, self.dtype).expand(len(c_items), -1, -1)

        def conditioned_on_c() -> dict:
            """What both pipelines get: c with classifier-free guidance, the steps, and fresh seeded generators."""
            return dict(
                prompt_embeds=c_items,
                negative_prompt_embeds=uncond,
                num_inference_steps=sampling.num_inference_steps,
                guidance_scale=sampling.guidance_scale,
                generator=[torch.Generator().manual_seed(k) for k in seeds],
                output_type="np",
            )

        # 2. Xc: text-to-image from c alone
        if include_xc:
            size = dict(height=self.output_size, width=self.output_size)
            xc = self.txt2img(**size, **conditioned_on_c()).images
        else:
            xc = np.zeros((0, self.output_size, self.output_size, 3), dtype=np.float32)

        # 3. Xzc: img2img from Xz, conditioned on c
        xzc = self.img2img(image=xz_items, strength=sampling.strength, **conditioned_on_c()).images

        size = self.output_size
        return Reconstruction(
            Xz=to_uint8((xz.float().permute(0, 2, 3, 1).cpu().numpy() + 1) / 2),
            Xc=to_uint8(xc).reshape(n if include_xc else 0, num_samples, size, size, 3),
            Xzc=to_uint8(xzc).reshape(n, num_samples, size, size, 3),
        )


@dataclass
class FollowUp:
    """The follow-up pipeline's models: the BLIP captioner (:func:`brainldm.captioner.load_captioner`), and for
    Xztd the DPT depth model (:func:`brainldm.depth.load_depth_model`) and Stable Diffusion 2 depth
    (:func:`brainldm.ldm.load_depth_ldm`). ``ids``: their model ids, recorded with the trials they make."""

    captioner: object
    depth_model: object | None = None
    depth_ldm: object | None = None
    ids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if (self.depth_model is None) != (self.depth_ldm is None):
            raise InputError("Xztd needs both a depth model (DPT) and a depth LDM (Stable Diffusion 2 depth)")

    @classmethod
    def for_maps(
        cls,
        maps,
        captioner: str | None = None,
        depth_model: str | None = None,
        depth_ldm: str | None = None,
        device=None,
    ) -> FollowUp:
        """The models for maps that decode ``blip`` (and ``dpt``): the captioner and depth model the maps were fitted
        to unless others are named, at the image size the embeddings were taken at, and Stable Diffusion 2 depth
        (``stabilityai/stable-diffusion-2-depth`` unless another is named) where the maps decode ``dpt``."""
        from .captioner import captioner_for
        from .ldm import DEPTH_MODEL, load_depth_ldm

        targets = maps.config.targets
        if "blip" not in targets:
            raise InputError(f"subject {maps.subject}'s maps do not decode blip, so no caption can be written")
        ids = {"captioner": captioner or targets["blip"].model_id}
        loaded = captioner_for(targets["blip"], captioner, device)
        if "dpt" not in targets:
            return cls(loaded, ids=ids)
        from .depth import load_depth_model

        ids["depth_model"] = depth_model or targets["dpt"].model_id
        ids["depth_ldm"] = depth_ldm or DEPTH_MODEL
        return cls(loaded, load_depth_model(ids["depth_model"], device), load_depth_ldm(ids["depth_ldm"], device), ids)

    @torch.no_grad()
    def __call__(
        self,
        reconstructor: Reconstructor,
        z: torch.Tensor,
        decoded: dict[str, torch.Tensor],
        sampling: Sampling = TAKAGI2023.sampling,
        keys: Sequence[int] | None = None,
    ) -> dict:
        """From decoded z, ``blip`` and (for Xztd) ``dpt`` of n images -> {"captions": n strings, "Xzt": (n,
        num_samples, H, W, 3) uint8, and with a depth model "depth": (n, h, w) float32 and "Xztd" like Xzt}. Sample k
        of an image starts from the noise of its Xzc's sample k."""
        from .captioner import captions_from_embeddings
        from .features import encode_prompts

        captions = captions_from_embeddings(self.captioner, decoded["blip"])
        c = encode_prompts(reconstructor.img2img, captions)
        out = {"captions": captions, "Xzt": reconstructor(z, c, sampling, include_xc=False, keys=keys).Xzc}
        if self.depth_model is None or "dpt" not in decoded:
            return out
        from .depth import depth_from_states, depth_img2img

        n, num_samples = len(z), sampling.num_samples
        depth = depth_from_states(self.depth_model, decoded["dpt"])
        seeds = sample_seeds(sampling, n, keys)
        init = ((reconstructor.decode_z(z).float() + 1) / 2).repeat_interleave(num_samples, dim=0)
        images = depth_img2img(
            self.depth_ldm,
            init,
            [caption for caption in captions for _ in range(num_samples)],
            depth.repeat_interleave(num_samples, dim=0),
            sampling,
            seeds,
        )
        size = reconstructor.output_size
        out["depth"] = depth.numpy()
        out["Xztd"] = to_uint8(images).reshape(n, num_samples, size, size, 3)
        return out


def noise_seed(seed: int, key: int, sample: int) -> int:
    """The seed of one image's sample: its own for every (seed, image key, sample), reproducible and independent of
    which other images share the batch (the paper's code drew each image's noise from one stream seeded once)."""
    return int(np.random.SeedSequence([seed, key, sample]).generate_state(1, np.uint64)[0] >> 1)


def sample_seeds(sampling: Sampling, n: int, keys: Sequence[int] | None = None) -> list[int]:
    """The seed of every (image, sample) item, image-major: :func:`noise_seed` of each key, or ``seed + k``."""
    return [
        sampling.seed + s if keys is None else noise_seed(sampling.seed, int(keys[i]), s)
        for i in range(n)
        for s in range(sampling.num_samples)
    ]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8."""
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


# --- test-set runs: PNGs per trial, resumable, sharded over processes ----------------------------------------


def trial_folder(out: str | Path, subject: int, split: str, row: int) -> Path:
    return Path(out) / subject_name(subject) / f"{split}-{row:05d}"


def is_done(folder: Path) -> bool:
    """meta.json is written last, so its presence means the trial's images are complete."""
    return (folder / "meta.json").exists()


def reconstruct_trials(
    reconstructor: Reconstructor,
    maps,
    data: str | Path,
    subject: int,
    out: str | Path,
    split: str = "test",
    rows: Sequence[int] | None = None,
    sampling: Sampling = TAKAGI2023.sampling,
    rescale: str | None = TAKAGI2023.rescale,
    batch_size: int = 1,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    followup: FollowUp | None = None,
) -> list[Path]:
    """Reconstruct trials of a split into ``OUT/subjNN/<split>-<row>/``: original, Xz, Xc_k and Xzc_k PNGs, the
    decoded z.npy and c.npy (fp16), and meta.json. With ``followup`` (maps that decode ``blip``, and ``dpt`` for
    Xztd), also Xzt_k (and depth.png, depth.npy, Xztd_k), and the decoded caption in caption.txt and meta.json.

    The requested rows are sharded by position over ``num_processes`` before anything is skipped, so concurrent
    processes never share a trial; each skips its finished trials (resume). A finished trial made with other
    settings is refused before any work, unless ``overwrite`` (then it is made again). ``rescale`` is passed to
    :meth:`~brainldm.maps.SubjectMaps.predict`. Returns this process's folders.
    """
    from .data import load_trials, load_voxels

    reconstructor.check_sampling(sampling)  # before anything is read or written
    maps.check_rescale(rescale)
    if followup is not None:
        needed = ["blip"] + (["dpt"] if followup.depth_model is not None else [])
        missing = [target for target in needed if target not in maps.config.targets]
        if missing:
            raise InputError(
                f"the follow-up pipeline decodes {' and '.join(missing)}, but subject {maps.subject}'s maps hold only "
                f"{sorted(maps.config.targets)}; fit them with scripts/fit_maps.py --decoders (see the README)"
            )
    trials = load_trials(data, subject, split)
    rows = list(range(len(trials))) if rows is None else [int(r) for r in rows]
    bad = [r for r in rows if not 0 <= r < len(trials)]
    if bad:
        raise InputError(f"trial {bad[0]} is out of range: the {split} split of subject {subject} has {len(trials)}")
    voxels = load_voxels(data, subject)
    maps.check_voxels(voxels)
    mine = rows[process_index::num_processes]
    settings = {**asdict(sampling), "model_id": maps.model_id, "rescale": rescale, "noise": "per image"}
    if followup is not None:
        settings["followup"] = followup.ids
    todo = [r for r in mine if not is_done(trial_folder(out, subject, split, r))]
    for row in sorted(set(mine) - set(todo)):
        folder = trial_folder(out, subject, split, row)
        made = json.loads((folder / "meta.json").read_text())
        changed = {k: (made.get(k), v) for k, v in settings.items() if made.get(k) != v}
        if changed and not overwrite:
            said = ", ".join(f"{k} {old} (now {new})" for k, (old, new) in changed.items())
            raise InputError(
                f"{folder} was made with {said}; use another --out, or --overwrite to make such trials again"
            )
        if changed:
            todo.append(row)
    todo.sort()
    log = Path(out) / subject_name(subject) / f"done.process{process_index}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"reconstruct [{process_index}]", unit="image", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        items = trials.select(batch)
        decoded = maps.predict(
            np.asarray(items.with_format("numpy")["betas"]), device=reconstructor.device, rescale=rescale
        )
        z, c = decoded["z"], decoded["c"]
        keys = [int(i) for i in items["nsd_id"]]
        result = reconstructor(z, c, sampling, keys=keys)
        more = followup(reconstructor, z, decoded, sampling, keys) if followup is not None else {}
        for k, row in enumerate(batch):
            item = items[k]
            images = {"original": np.asarray(item["image"].convert("RGB")), "Xz": result.Xz[k]}
            for s in range(sampling.num_samples):
                images[f"Xc_{s}"] = result.Xc[k, s]
                images[f"Xzc_{s}"] = result.Xzc[k, s]
                images.update({f"{kind}_{s}": more[kind][k, s] for kind in ("Xzt", "Xztd") if kind in more})
            # the decoded targets, for retrieval; BLIP's and DPT's are kept as what they decode to (caption, depth)
            arrays = {
                name: t[k].cpu().numpy().astype(np.float16) for name, t in decoded.items() if name not in AUXILIARY
            }
            if "depth" in more:
                from .depth import depth_image

                images["depth"] = depth_image(more["depth"][k])
                arrays["depth"] = more["depth"][k].astype(np.float32)  # DPT's depth runs past float16's range
            meta = {
                "subject": subject,
                "split": split,
                "row": row,
                "nsd_id": int(item["nsd_id"]),
                "captions": item["captions"],
                "sessions": item.get("sessions"),  # which test sets the image belongs to (evaluate.sets_of_test_images)
                **settings,
                "process_index": process_index,
            }
            if "captions" in more:
                meta["decoded_caption"] = more["captions"][k]
            _write_trial(trial_folder(out, subject, split, row), images, arrays, meta)
            with log.open("a") as f:
                f.write(f"{row}\n")
        bar.update(len(batch))
    bar.close()
    return [trial_folder(out, subject, split, r) for r in mine]


def _write_trial(folder: Path, images: dict[str, np.ndarray], arrays: dict[str, np.ndarray], meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        with atomic_path(folder / f"{name}.png") as tmp:
            Image.fromarray(image).save(tmp)
    for name, array in arrays.items():
        with atomic_path(folder / f"{name}.npy") as tmp:
            np.save(tmp, array)
    if "decoded_caption" in meta:
        with atomic_path(folder / "caption.txt") as tmp:
            tmp.write_text(meta["decoded_caption"] + "\n")
    with atomic_path(folder / "meta.json") as tmp:  # written last: its presence marks the trial done
        tmp.write_text(json.dumps(meta, indent=2))


def load_trial_images(folder: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {name: image}) of a finished trial folder."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    images = {}
    for path in sorted(folder.glob("*.png")):
        try:
            with Image.open(path) as image:
                images[path.stem] = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or foreign files
            raise InputError(
                f"cannot read {path}: {oneline(err)}; delete {folder} and rerun reconstruct.py to make it again"
            ) from err
    return meta, images


def write_contact_sheet(folders: Sequence[Path], path: str | Path, max_rows: int = 12) -> Path:
    """One row per trial: original, Xz, then Xc and Xzc for each sample."""
    from .viz import contact_sheet

    rows, titles, columns = [], [], []
    for folder in [f for f in folders if is_done(f)][:max_rows]:
        meta, images = load_trial_images(folder)
        samples = range(meta["num_samples"])
        columns = ["original", "Xz"] + [f"Xc {s}" for s in samples] + [f"Xzc {s}" for s in samples]
        keys = ["original", "Xz"] + [f"Xc_{s}" for s in samples] + [f"Xzc_{s}" for s in samples]
        rows.append([images[k] for k in keys])
        titles.append(f"nsd {meta['nsd_id']}")
    if not rows:
        raise InputError("no finished reconstructions to put on a contact sheet")
    return contact_sheet(rows, path, column_titles=columns, row_titles=titles)
