"""The demo's backend: subjects, their test trials, decoding and reconstruction, with no UI code.

``app.py`` is the Gradio face of :class:`DemoBackend`; everything it shows is computed here, through the same
library calls as the scripts (``SubjectMaps.from_pretrained``, ``load_trials``, ``Reconstructor``).

Sources: ``maps`` is a local folder holding ``subjNN/`` map folders (``weights/`` by default), a single map folder,
or a Hub repo id pattern such as ``"user/brainldm-subj{subject:02d}"``; ``data`` is a prepared dataset folder or
Hub dataset repo id. With neither available, :func:`offline_sources` builds a synthetic subject and fits its maps
at start-up, with the trained offline LDM ``toy``.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import load_trials, load_voxels
from .features import encode_c, encode_z
from .ldm import load_ldm
from .maps import SubjectMaps
from .metrics import identification_rank, pattern_correlation
from .presets import TAKAGI2023
from .reconstruct import Reconstructor
from .validation import InputError

OFFLINE_BANNER = (
    "**Offline demo.** No fitted maps or NSD data were found, so this runs on a *synthetic* subject (brainldm's "
    "offline world: NSD-format files with planted responses) whose maps were fitted at start-up, and on `toy`, a "
    "small Stable-Diffusion-shaped model trained on the offline world's pictures of shapes. The pipeline is the "
    "real one. Point `BRAINLDM_MAPS` and `BRAINLDM_DATA` at fitted maps and a prepared NSD dataset for "
    "reconstructions of what NSD subjects saw."
)


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
    if (folder / "maps.safetensors").is_file():
        return [SubjectMaps.from_pretrained(folder).subject]
    return sorted(int(p.name[4:]) for p in folder.glob("subj[0-9][0-9]") if (p / "maps.safetensors").is_file())


def maps_location(maps: str, subject: int) -> str:
    """Where subject's maps are: a ``{subject}`` pattern filled in, ``DIR/subjNN``, or the single map folder."""
    if "{subject" in maps:
        return maps.format(subject=subject)
    folder = Path(maps)
    if (folder / "maps.safetensors").is_file():
        return str(folder)
    if folder.is_dir():
        return str(folder / f"subj{subject:02d}")
    return maps


def offline_sources(root: str | Path | None = None, subjects: tuple[int, ...] = (1, 2)) -> Sources:
    """Build the offline world: a synthetic NSD tree, its trials dataset, toy-LDM features and fitted maps.

    With pycortex installed the subjects are laid out on its S1 subject, and each subject's encoding flatmaps
    (z vs c) are drawn into ``weights/subjNN/figures`` for the app's "Cortical maps" tab.
    """
    from importlib.util import find_spec

    from .data import SubjectStimuli, prepare_subject
    from .encoding import run_encoding
    from .features import extract_features, parse_features
    from .maps import fit_subject_maps
    from .surfaces import OFFLINE_SPACE
    from .synthetic import OFFLINE_SNR, write_nsd_tree

    root = Path(root or tempfile.mkdtemp(prefix="brainldm-offline-"))
    ldm = load_ldm("toy", device="cpu")
    anatomy = "S1" if find_spec("cortex") else "blob"
    tree = write_nsd_tree(
        root / "nsd", subjects, n_sessions=6, trials_per_session=45, n_shared=20, snr=OFFLINE_SNR, ldm=ldm, seed=1,
        anatomy=anatomy,
    )  # fmt: skip
    for subject in subjects:
        prepare_subject(tree.root, subject, root / "trials", progress=False)
        stimuli = SubjectStimuli(root / "trials", subject)
        extract_features(
            ldm, "toy", stimuli.nsd_ids, stimuli.__getitem__, parse_features("z,c"), root / "features", progress=False
        )
        maps = fit_subject_maps(root / "trials", root / "features", subject, device="cpu")
        folder = root / "weights" / f"subj{subject:02d}"
        maps.save_pretrained(folder)
        if anatomy == "S1":  # encoding over the stored visual-cortex voxels: the whole brain would double start-up
            run_encoding(
                root / "trials", root / "features", subject, ["z", "c"], folder / "figures", whole_brain=False,
                n_components=32, device="cpu", progress=False, space=OFFLINE_SPACE,
            )  # fmt: skip
    return Sources(str(root / "weights"), str(root / "trials"), "toy", list(subjects), offline=True)


class Subject:
    """One subject's maps and test trials, with the decoded and true features of every test image."""

    def __init__(self, subject: int, maps: SubjectMaps, data: str, ldm, batch_size: int = 32):
        if maps.subject != subject:
            raise InputError(f"the maps found for subject {subject} are subject {maps.subject}'s")
        self.subject = subject
        self.maps = maps
        voxels = load_voxels(data, subject)
        maps.check_voxels(voxels)  # maps and data of different subjects fail here
        self.test = load_trials(data, subject, "test")
        betas = np.asarray(self.test.with_format("numpy")["betas"])
        self.z_pred, self.c_pred = (x.numpy() for x in maps.predict(betas))
        # true features in bounded batches: images are decoded and encoded batch_size at a time, so memory does not
        # grow with the test set (NSD's has about 1,000 images)
        z_true, c_true = [], []
        for start in range(0, len(self.test), batch_size):
            rows = self.test[start : start + batch_size]
            z_true.append(encode_z(ldm, rows["image"]).numpy())
            c_true.append(encode_c(ldm, rows["captions"]).numpy())
        self.z_true, self.c_true = np.concatenate(z_true), np.concatenate(c_true)
        self.rank = {
            "z": identification_rank(self.z_pred, self.z_true),
            "c": identification_rank(self.c_pred, self.c_true),
        }

    def __len__(self) -> int:
        return len(self.test)

    def check_trial(self, trial) -> int:
        if trial is None or not float(trial).is_integer() or not 0 <= int(trial) < len(self):
            last = len(self) - 1
            raise InputError(f"trial {trial} is out of range: subject {self.subject} has test trials 0..{last}")
        return int(trial)

    def quality(self, trial: int) -> dict[str, float]:
        """How well this trial's z and c were decoded: r with the true features and identification rank."""
        item = slice(trial, trial + 1)
        return {
            "z_r": float(pattern_correlation(self.z_pred[item], self.z_true[item])[0]),
            "c_r": float(pattern_correlation(self.c_pred[item], self.c_true[item])[0]),
            "z_rank": int(self.rank["z"][trial]),
            "c_rank": int(self.rank["c"][trial]),
            "n_candidates": len(self),
        }


class DemoBackend:
    """Loads the LDM once and each subject on first use; reconstructs test trials.

    ``batch_size``: test images encoded at a time when a subject loads (bounds memory; see :class:`Subject`).
    """

    def __init__(self, sources: Sources, device: str | None = None, batch_size: int = 32):
        self.sources = sources
        self.device = device
        self.batch_size = batch_size
        self._subjects: dict[int, Subject] = {}
        self._lock = threading.Lock()
        self._ldm = None
        self.reconstructor: Reconstructor | None = None

    def _load_ldm(self, fitted_for: str):
        """The LDM, loaded once: the configured model, else the one the first subject's maps were fitted for."""
        if self._ldm is None:
            self._ldm = load_ldm(self.sources.model or fitted_for, device=self.device)
            self.reconstructor = Reconstructor(self._ldm)
            for pipe in (self.reconstructor.img2img, self.reconstructor.txt2img):
                pipe.set_progress_bar_config(disable=False, desc="denoising")  # gr.Progress follows tqdm
        return self._ldm

    def subject(self, subject: int) -> Subject:
        """A subject's state, loaded on first use (maps, test trials, decoded and true features)."""
        subject = int(subject)
        with self._lock:
            if subject not in self._subjects:
                maps = SubjectMaps.from_pretrained(maps_location(self.sources.maps, subject))
                ldm = self._load_ldm(maps.model_id)
                self._subjects[subject] = Subject(subject, maps, self.sources.data, ldm, self.batch_size)
            return self._subjects[subject]

    def gallery(self, subject: int) -> list[tuple[np.ndarray, str]]:
        """(image, caption) of every test trial, in trial order."""
        test = self.subject(subject).test
        return [(np.asarray(row["image"].convert("RGB")), row["captions"][0]) for row in test]

    def reconstruct(
        self,
        subject: int,
        trial: int,
        strength: float = TAKAGI2023.strength,
        guidance_scale: float = TAKAGI2023.guidance_scale,
        num_inference_steps: int = TAKAGI2023.num_inference_steps,
        seed: int = TAKAGI2023.seed,
        num_samples: int = 1,
    ) -> dict:
        """The presented image, Xz, Xc and Xzc samples of one test trial, and its decoding quality."""
        state = self.subject(subject)
        trial = state.check_trial(trial)
        z, c = torch.from_numpy(state.z_pred[trial : trial + 1]), torch.from_numpy(state.c_pred[trial : trial + 1])
        result = self.reconstructor(
            z,
            c,
            strength=float(strength),
            guidance_scale=float(guidance_scale),
            num_inference_steps=int(num_inference_steps),
            seed=int(seed),
            num_samples=int(num_samples),
        )
        row = state.test[trial]
        size = self.reconstructor.output_size  # shown at the reconstructions' size, for comparison
        return {
            "presented": np.asarray(row["image"].convert("RGB").resize((size, size), Image.Resampling.BICUBIC)),
            "captions": row["captions"],
            "Xz": result.Xz[0],
            "Xc": list(result.Xc[0]),
            "Xzc": list(result.Xzc[0]),
            "quality": state.quality(trial),
        }

    def cortical_maps(self, subject: int) -> list[tuple[str, str]]:
        """(PNG path, title) of the subject's cortical map figures, if any were saved beside its maps."""
        location = Path(maps_location(self.sources.maps, int(subject)))
        folder = location / "figures"
        if not folder.is_dir():
            return []
        # flatmaps first: they are what people read these results from
        paths = sorted(folder.glob("*.png"), key=lambda p: (not p.stem.startswith("flatmap"), p.name))
        return [(str(p), p.stem.replace("_", " ")) for p in paths]
