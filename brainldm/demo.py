"""The demo's backend: subjects, their test trials, decoding and reconstruction, with no UI code.

``app.py`` is the Gradio face of :class:`DemoBackend`; everything it shows is computed here, through the same
library calls as the scripts (``SubjectMaps.from_pretrained``, ``load_trials``, ``Reconstructor``).

Sources: ``maps`` is a local folder holding ``subjNN/`` map folders (``weights/`` by default), a single map folder,
or a Hub repo id pattern such as ``"user/brainldm-subj{subject:02d}"``; ``data`` is a prepared dataset folder or
Hub dataset repo id. With neither available, :func:`offline_sources` builds a synthetic subject and fits its maps
at start-up, with the trained offline LDM ``toy``.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from brainldm.analysis.encoding_job import GROUP_FIGURE, read_captions, run_encoding, write_group_summary
from brainldm.analysis.extractors import clip_extractor, stand_in_clip_extractor
from brainldm.data.trials import load_trials, load_voxels
from brainldm.decoding.maps import WEIGHTS_FILE, SubjectMaps
from brainldm.ldm.captioner import captioner_for, captions_from_embeddings
from brainldm.ldm.loading import load_ldm
from brainldm.ldm.reconstruct import Reconstruction, Reconstructor
from brainldm.metrics import identification_rank, pixel_vectors
from brainldm.offline import twins
from brainldm.offline.synthetic import OFFLINE_SNR, OFFLINE_SPACE
from brainldm.offline.world import build_offline_world
from brainldm.paths import atomic_path, subject_name
from brainldm.presets import TAKAGI2023, Sampling
from brainldm.validation import InputError

THUMBNAIL_SIZE = 128  # px, the gallery's longest side

OFFLINE_BANNER = (
    "**Offline demo.** No fitted maps or NSD data were found, so this runs on a *synthetic* subject (brainldm's "
    "offline world: NSD-format files with planted responses) whose maps were fitted at start-up, and on `toy`, a "
    "small Stable-Diffusion-shaped model (128 px) trained on the offline world's pictures of patterned animals. The "
    "pipeline is the real one. Point `BRAINLDM_MAPS` and `BRAINLDM_DATA` at fitted maps and a prepared NSD dataset "
    "for reconstructions of what NSD subjects saw."
)
SHOWCASE_SIZE = 96  # px per image in the showcase's thumbnails


@dataclass
class Sources:
    maps: str
    data: str
    model: str | None  # None: the model the maps were fitted for
    subjects: list[int]
    offline: bool = False


def find_subjects(maps: str) -> list[int]:
    """Subjects with maps in a local folder of ``subjNN/`` folders (or the one subject of a single map folder)."""
    folder = Path(maps)
    if (folder / WEIGHTS_FILE).is_file():
        return [SubjectMaps.from_pretrained(folder).subject]
    return sorted(int(p.name[4:]) for p in folder.glob("subj[0-9][0-9]") if (p / WEIGHTS_FILE).is_file())


def maps_location(maps: str, subject: int) -> str:
    """Where subject's maps are: a ``{subject}`` pattern filled in, ``DIR/subjNN``, or the single map folder."""
    if "{subject" in maps:
        return maps.format(subject=subject)
    folder = Path(maps)
    if (folder / WEIGHTS_FILE).is_file():
        return str(folder)
    if folder.is_dir():
        return str(folder / subject_name(subject))
    return maps


def resolve_sources(maps: str | None, data: str | None, model: str | None, subjects: str | None) -> Sources:
    """The app's sources from its flags, else ``BRAINLDM_MAPS`` / ``BRAINLDM_DATA`` / ``BRAINLDM_MODEL`` (maps default
    to ``weights/``); with no data or no subject with maps, the offline world (:func:`offline_sources`)."""
    maps = maps or os.environ.get("BRAINLDM_MAPS") or "weights"
    data = data or os.environ.get("BRAINLDM_DATA")
    model = model or os.environ.get("BRAINLDM_MODEL")
    if subjects:
        chosen = [int(s) for s in subjects.split(",")]
    elif "{subject" in maps:
        chosen = list(TAKAGI2023.subjects)
    else:
        chosen = find_subjects(maps) if os.path.isdir(maps) else [1]
    if not data or not chosen:
        return offline_sources()
    return Sources(maps=maps, data=data, model=model, subjects=chosen)


def offline_sources(root: str | Path | None = None, subjects: tuple[int, ...] = (1, 2)) -> Sources:
    """Build the offline world: a synthetic NSD tree, its trials dataset, toy-LDM features and fitted maps.

    With pycortex installed the subjects are laid out on its S1 subject, and each subject's encoding flatmaps
    (z vs c) are drawn into ``weights/subjNN/figures`` and their group summary into ``weights/figures``, for the
    app's "Cortical maps" tab.
    """
    from importlib.util import find_spec

    twins.register()  # the offline models by name, also where brainldm is not installed (see DemoBackend)
    root = Path(root or tempfile.mkdtemp(prefix="brainldm-offline-"))
    anatomy = "S1" if find_spec("cortex") else "blob"
    world = build_offline_world(
        root, load_ldm("toy", device="cpu"), "toy", subjects, n_sessions=6, trials_per_session=45, n_shared=20,
        snr=OFFLINE_SNR, seed=1, anatomy=anatomy,
    )  # fmt: skip
    encoded = {}
    for subject, maps in world.maps.items():
        folder = root / "weights" / subject_name(subject)
        maps.save_pretrained(folder)
        if anatomy == "S1":  # encoding over the stored visual-cortex voxels: the whole brain would double start-up
            encoded[subject] = run_encoding(
                world.data, world.features, subject, ["z", "c"], folder / "figures", whole_brain=False,
                n_components=32, device="cpu", progress=False, space=OFFLINE_SPACE,
            )  # fmt: skip
    if len(encoded) > 1:
        write_group_summary(encoded, root / "weights" / "figures")
    return Sources(str(root / "weights"), str(root / "trials"), "toy", list(subjects), offline=True)


class Subject:
    """One subject's maps and test split. Loading it does no work per test image: z and c are decoded for one trial
    when it is reconstructed, and each image's decoding quality was scored when the maps were fitted (and is read
    from them), so start-up time and memory do not grow with the test set (NSD's has about 1,000 images)."""

    def __init__(self, subject: int, maps: SubjectMaps, data: str):
        if maps.subject != subject:
            raise InputError(f"the maps found for subject {subject} are subject {maps.subject}'s")
        self.subject = subject
        self.maps = maps
        maps.check_voxels(load_voxels(data, subject))  # maps and data of different subjects fail here
        self.test = load_trials(data, subject, "test")  # memory-mapped Arrow: rows are read when asked for
        self.nsd_ids = np.asarray(self.test.select_columns(["nsd_id"])["nsd_id"])  # 8 bytes per image

    def __len__(self) -> int:
        return len(self.test)

    def check_trial(self, trial) -> int:
        try:
            number = float(trial)
        except (TypeError, ValueError):
            raise InputError(f"trial must be a test trial's number, got {trial!r}") from None
        if not number.is_integer() or not 0 <= number < len(self):
            last = len(self) - 1
            raise InputError(f"trial {trial} is out of range: subject {self.subject} has test trials 0..{last}")
        return int(trial)

    def decode(self, trial: int, rescale: str | None = None) -> dict[str, torch.Tensor]:
        """The trial's decoded targets, {name: (1, *shape)} on the CPU (``rescale``: see ``SubjectMaps.predict``)."""
        betas = np.asarray(self.test.with_format("numpy")[self.check_trial(trial)]["betas"])
        return self.maps.predict(betas[None], rescale=rescale)

    def quality(self, trial: int) -> dict | None:
        """How well this trial's targets (z, c, ...) were decoded, ``{"targets": {name: {"r", "rank"}},
        "n_candidates"}`` (r with the true features, identification rank), as scored when the maps were fitted; None
        if the maps hold no score for its image."""
        scores = self.maps.image_scores(int(self.nsd_ids[self.check_trial(trial)]))
        return None if scores is None else {"targets": scores, "n_candidates": self.maps.config.n_test}

    def thumbnails(self, folder: Path, size: int = THUMBNAIL_SIZE) -> list[tuple[str, str]]:
        """(JPEG path, first caption) of every test trial, written once into ``folder`` (the gallery sends these
        small files by URL instead of every full image on each subject change)."""
        folder.mkdir(parents=True, exist_ok=True)
        items = []
        rows = self.test.select_columns(["image", "captions"])
        for trial in range(len(rows)):
            path = folder / f"{trial:05d}.jpg"
            row = rows[trial]
            if not path.exists():
                image = row["image"].convert("RGB")
                image.thumbnail((size, size), Image.Resampling.BICUBIC)
                with atomic_path(path) as tmp:
                    image.save(tmp, quality=90)
            items.append((str(path), row["captions"][0]))
        return items


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th'."""
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def gpu_seconds(sampling: Sampling) -> int:
    """ZeroGPU's time budget for one reconstruction: it grows with steps x samples (Xc runs every step, Xzc
    ``strength`` of them), with room for a slow GPU (about 0.1 s per guided SD-1.x step) and a fixed start."""
    steps = sampling.num_inference_steps * (1 + sampling.strength) * sampling.num_samples
    return int(15 + 0.1 * steps)


class DemoBackend:
    """The LDM, loaded once at construction, and each subject on first use; reconstructs test trials.

    The LDM is placed on its device here, when the app is built, not inside a request: on a ZeroGPU Space that is
    where ``spaces`` expects models to be moved to CUDA. Only :meth:`generate` touches the GPU; everything else
    (loading subjects, decoding z and c, thumbnails) runs in the main process, and the lock that guards the subject
    cache is never taken inside the GPU function (ZeroGPU forks a worker for it, and a lock copied into a fork while
    held would never be released there). ``output_size``: the reconstructions' size in px (default: the LDM's own).
    """

    def __init__(self, sources: Sources, device: str | None = None, output_size: int | None = None):
        # A Space runs app.py from its checkout, where no package metadata registers the offline models through the
        # entry point: the app registers them itself, so "toy" and "tiny" load there too
        twins.register()
        self.sources = sources
        self._subjects: dict[int, Subject] = {}
        self._lock = threading.Lock()
        self._thumbnails = Path(tempfile.mkdtemp(prefix="brainldm-thumbnails-"))
        self.model_id = sources.model or self._maps(sources.subjects[0]).model_id
        self.reconstructor = Reconstructor(load_ldm(self.model_id, device=device), output_size)
        for pipe in (self.reconstructor.img2img, self.reconstructor.txt2img):
            pipe.set_progress_bar_config(disable=False, desc="denoising")  # gr.Progress follows tqdm
        self._clip: Callable | None = None
        self.clip_name = "CLIP"
        self._references: dict[int, dict[str, np.ndarray]] = {}
        self._captioners: dict[int, object] = {}  # per subject whose maps decode blip: its BLIP captioner
        self._showcases: dict[tuple, list[dict]] = {}
        self._showcase_lock = threading.Lock()  # two first visitors at once: one computes, the other waits for it

    def _maps(self, subject: int) -> SubjectMaps:
        return SubjectMaps.from_pretrained(maps_location(self.sources.maps, subject))

    def subject(self, subject: int) -> Subject:
        """A subject's maps and test split, loaded on first use."""
        subject = int(subject)
        with self._lock:
            if subject not in self._subjects:
                self._subjects[subject] = Subject(subject, self._maps(subject), self.sources.data)
            return self._subjects[subject]

    def image_file(self, image: np.ndarray) -> str:
        """``image`` (h, w, 3 uint8) as a PNG named by its content, for the app's result panels.

        Gradio 6 caches a returned array by rewriting its content-named file in place
        (``processing_utils.save_pil_to_cache``), so two visitors shown the same image at once could be served a
        half-written file; a returned path it copies into its cache atomically. So is this file.
        """
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
        data = buffer.getvalue()
        path = self._thumbnails / "results" / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
        if not path.exists():
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        return str(path)

    def gallery(self, subject: int) -> list[tuple[str, str]]:
        """(thumbnail path, caption) of every test trial, in trial order."""
        state = self.subject(subject)
        with self._lock:  # two first visits at once must not write the same thumbnails
            return state.thumbnails(self._thumbnails / subject_name(subject))

    def generate(self, z: torch.Tensor, c: torch.Tensor, sampling: Sampling, keys: list[int]) -> Reconstruction:
        """Xz, Xc and Xzc from decoded z and c (``keys``: the images' nsd_ids, which seed their noise): the only GPU
        work, what the app runs under ``@spaces.GPU``."""
        return self.reconstructor(z, c, sampling, keys=keys)

    def reconstruct(
        self,
        subject: int,
        trial: int,
        sampling: Sampling = TAKAGI2023.sampling,
        generate: Callable[[torch.Tensor, torch.Tensor, Sampling, list[int]], Reconstruction] | None = None,
        rescale: str | None = TAKAGI2023.rescale,
    ) -> dict:
        """The presented image, Xz, Xc and Xzc samples of one test trial, its decoding quality (from the maps) and
        ``ranks``: for each of Xz, Xc and Xzc (sample 0), where the presented picture ranks among the subject's
        ``n_candidates`` test pictures by pixels and by CLIP (:meth:`ranks`).

        ``generate`` runs the GPU part (default :meth:`generate`; the app passes its ``@spaces.GPU`` wrapper);
        ``rescale`` is passed to :meth:`~brainldm.decoding.maps.SubjectMaps.predict`.
        """
        self.reconstructor.check_sampling(sampling)  # a count of samples past the limit, say, before any work
        state = self.subject(subject)
        trial = state.check_trial(trial)
        rescale, note = self.rescale_for(subject, rescale)
        decoded = state.decode(trial, rescale)
        result = (generate or self.generate)(decoded["z"], decoded["c"], sampling, [int(state.nsd_ids[trial])])
        row = state.test[trial]
        size = self.reconstructor.output_size  # shown at the reconstructions' size, for comparison
        images = {"Xz": result.Xz[0], "Xc": result.Xc[0, 0], "Xzc": result.Xzc[0, 0]}
        return {
            "presented": np.asarray(row["image"].convert("RGB").resize((size, size), Image.Resampling.BICUBIC)),
            "captions": row["captions"],
            "decoded_caption": self.decoded_caption(subject, decoded),
            "Xz": result.Xz[0],
            "Xc": list(result.Xc[0]),
            "Xzc": list(result.Xzc[0]),
            "quality": state.quality(trial),
            "ranks": {kind: self.ranks(subject, trial, image) for kind, image in images.items()},
            "n_candidates": len(state),
            "clip_name": self.clip_name,
            "note": note,
        }

    def rescale_for(self, subject: int, rescale: str | None) -> tuple[str | None, str | None]:
        """The rescaling a subject's maps support: ``rescale`` itself (and no note), or, for maps fitted before
        brainldm stored the rescaling statistics, None (as fitted) with a line saying why."""
        if rescale is None or self.subject(subject).maps.can_rescale:
            return rescale, None
        return None, (
            f"Subject {int(subject)}'s maps were fitted before brainldm stored the rescaling statistics, so decoded z "
            "and c are used as fitted."
        )

    def decoded_caption(self, subject: int, decoded: dict[str, torch.Tensor]) -> str | None:
        """The caption BLIP writes from the decoded image embedding, where the subject's maps decode ``blip`` (the
        follow-up pipeline, :mod:`brainldm.ldm.captioner`); None otherwise. Its captioner is loaded on first use."""
        if "blip" not in decoded:
            return None

        target = self.subject(subject).maps.config.targets["blip"]
        with self._lock:
            if int(subject) not in self._captioners:
                self._captioners[int(subject)] = captioner_for(target)
        return captions_from_embeddings(self._captioners[int(subject)], decoded["blip"])[0]

    def clip(self) -> Callable | None:
        """The CLIP image embedding that scores what the pictures show, as ``evaluate`` chooses it: the LDM's own
        vision tower where it ships one (toy's, offline), else CLIP ViT-L/14; None if it cannot be loaded (no
        network)."""
        if self._clip is None:
            try:
                self._clip = stand_in_clip_extractor(self.model_id, device="cpu")
                if self._clip is not None:
                    self.clip_name = "CLIP (toy's vision tower)"
                else:
                    self._clip, self.clip_name = clip_extractor(device="cpu"), "CLIP ViT-L/14"
            except (OSError, ValueError):  # offline without the checkpoint in the cache: pixels only
                self._clip = False
        return self._clip or None

    def _reference_features(self, subject: int) -> dict[str, np.ndarray]:
        """Pixel and CLIP features of every test picture of ``subject``, computed once."""
        state = self.subject(subject)  # before the lock, which subject() takes itself
        with self._lock:
            if subject not in self._references:
                pictures = [np.asarray(im.convert("RGB")) for im in state.test.select_columns(["image"])["image"]]
                features = {"pixels": pixel_vectors(pictures)}
                if self.clip() is not None:
                    features["clip"] = self.clip()(pictures)
                self._references[subject] = features
            return self._references[subject]

    def ranks(self, subject: int, trial: int, image: np.ndarray) -> dict[str, int]:
        """Where the presented picture of ``trial`` ranks among the subject's test pictures (1 = best) by how alike
        each is to ``image``, by pixels and (when available) by CLIP."""
        references = self._reference_features(subject)
        out = {}
        for name, features in references.items():
            mine = pixel_vectors([image]) if name == "pixels" else self.clip()([image])
            out[name] = int(identification_rank(mine, features, targets=[trial])[0])
        return out

    def showcase_trials(self, subject: int) -> list[tuple[str, int]]:
        """(label, trial) of the subject's best, median and worst test trials by the maps' own fit-time scores (the
        mean over targets of each image's r with its true features)."""
        state = self.subject(subject)
        scores = [state.quality(t) for t in range(len(state))]
        if any(q is None for q in scores):
            picks = [0, len(state) // 2, len(state) - 1]
        else:
            mean = np.array([np.mean([t["r"] for t in q["targets"].values()]) for q in scores])
            order = np.argsort(-mean, kind="stable")
            picks = [int(order[0]), int(order[len(order) // 2]), int(order[-1])]
        return list(zip(("best", "median", "worst"), picks))

    def showcase(self, subject: int, sampling: Sampling = TAKAGI2023.sampling, rescale: str | None = None,
                 generate=None) -> list[dict]:  # fmt: skip
        """The reconstructions of :meth:`showcase_trials`, each with a thumbnail of its four images side by side
        (``thumbnail``, a JPEG path) and a ``label``: computed on first use, then kept for every visitor."""
        key = (int(subject), sampling, self.rescale_for(subject, rescale)[0])
        with self._showcase_lock:
            if key not in self._showcases:
                self._showcases[key] = self._make_showcase(key, generate)
            return self._showcases[key]

    def _make_showcase(self, key: tuple, generate) -> list[dict]:
        subject, sampling, rescale = key
        shown = []
        for label, trial in self.showcase_trials(subject):
            out = self.reconstruct(subject, trial, sampling, generate=generate, rescale=rescale)
            images = [out["presented"], out["Xz"], out["Xc"][0], out["Xzc"][0]]
            size, gap = SHOWCASE_SIZE, 4
            strip = np.full((size, 4 * size + 3 * gap, 3), 255, dtype=np.uint8)
            for k, image in enumerate(images):
                small = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
                strip[:, k * (size + gap) : k * (size + gap) + size] = np.asarray(small)
            path = self._thumbnails / subject_name(subject) / f"showcase-{len(self._showcases)}-{trial:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                Image.fromarray(strip).save(tmp, quality=90)
            shown.append({**out, "trial": trial, "label": f"{label}: trial {trial}", "thumbnail": str(path)})
        return shown

    def cortical_maps(self, subject: int, which: str = "all") -> list[tuple[str, str]]:
        """(PNG path, title) of the subject's cortical map figures, after the summary across subjects when there is
        one; ``which="group"``: the summary only (or, with none, the subject's), ``"subject"``: the subject's only.
        In a folder of subjects' maps, ``figures/`` holds what ``encoding.py --subjects`` writes (the group summary,
        and each subject's figures in ``figures/subjNN``); ``subjNN/figures`` beside the maps, if there, is used
        instead."""

        group = Path(self.sources.maps) / "figures"
        # the summary across subjects: accuracy per ROI first, then the sweeps
        summaries = sorted(group.glob("group_*.png"), key=lambda p: (p.name != GROUP_FIGURE, p.name))
        captions = read_captions(group)
        summary = [(str(p), "all subjects: " + captions.get(p.name, p.stem)) for p in summaries]
        own = Path(maps_location(self.sources.maps, int(subject))) / "figures"
        folder = own if own.is_dir() else group / subject_name(int(subject))
        if folder.is_dir():
            # flatmaps first: they are what people read these results from
            paths = sorted(folder.glob("*.png"), key=lambda p: (not p.stem.startswith("flatmap"), p.name))
            captions = read_captions(folder)
            own = [(str(p), f"subject {int(subject)}: " + captions.get(p.name, p.stem)) for p in paths]
        else:
            own = []
        return {"all": summary + own, "group": summary or own, "subject": own}[which]
