"""The real run rehearsed at full size: NSD-sized data served from a local S3 bucket, every model at its real
architecture with seeded random weights, every step of the real pipeline run through its own script.

:func:`rehearse` writes a synthetic subject at NSD's real size (:func:`write_full_size_subject`), serves it as
``s3://natural-scenes-dataset`` (:class:`~brainldm.offline.bucket.FolderS3`) and its COCO annotations archive as
COCO's site (:class:`~brainldm.offline.site.FolderSite`, reached as an HTTP proxy: NSD's bucket holds no captions),
then runs ``scripts/prepare_nsd.py``, ``extract_features.py`` (z, c, blip, dpt), ``fit_maps.py`` (the paper's and the
follow-up's decoders, default ranks), ``reconstruct.py`` (``--rescale target`` and the follow-up), ``evaluate.py``,
``encoding.py`` and ``app.py`` (one reconstruction through its API), each in its own process. Only the model ids
differ from a real run (``random-sd14``, ``random-blip``, ``random-dpt-large``, ``random-sd2-depth``; ``evaluate``
scores them with random-weight networks).

Each step is measured from outside (wall time, the process's own peak RSS, GPU memory from ``nvidia-smi`` where there
is one, bytes fetched from the bucket and from COCO's site, bytes written to disk) and what it wrote is checked
against the shapes the real models give (:data:`REAL_SHAPES`): a step that fails or writes another shape stops the
rehearsal. :func:`needs_table` then says what the real run needs: checkpoints, disk per subject and GPU memory.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from brainldm.analysis.encoding import MIN_TEST_IMAGES
from brainldm.analysis.extractors import CLIP_MODEL, TORCHVISION_METRICS, check_torchvision
from brainldm.analysis.protocol import METRICS
from brainldm.cli import byte_size
from brainldm.data import nsd
from brainldm.data.features import FeatureStore
from brainldm.data.trials import load_trials, load_voxels
from brainldm.decoding.maps import SubjectMaps
from brainldm.ldm.captioner import BLIP_MODEL
from brainldm.ldm.depth import DPT_MODEL, states_shape
from brainldm.ldm.loading import DEPTH_MODEL
from brainldm.ldm.reconstruct import KINDS
from brainldm.offline.bucket import FolderS3
from brainldm.offline.site import FolderSite
from brainldm.offline.synthetic import default_coco_root, write_nsd_tree
from brainldm.offline.twins import (
    random_blip_captioner,
    random_clip_l14,
    random_dpt_large,
    random_sd2_depth_ldm,
    random_sd14_ldm,
)
from brainldm.paths import subject_name
from brainldm.presets import TAKAGI2023
from brainldm.reconstruction.folders import load_trial_images
from brainldm.validation import InputError

BUCKET = "natural-scenes-dataset"
NSD_PICTURES, NSD_SIDE = 73_000, 425  # nsd_stimuli.hdf5's imgBrick: 73,000 pictures of 425 x 425
NSDGENERAL_THICKNESS = 0.032  # the synthetic brain's ROI shell depth that gives NSD's ~16k stored voxels
# What the real models give, so what every file of the real run holds: facts of the checkpoints, written out (not
# derived from the presets) so that a preset or a code path that drifts from them shows
REAL_SHAPES = {
    "picture": (NSD_SIDE, NSD_SIDE, 3),
    "z": (4, 40, 40),  # SD-1.4's VAE (8x down, 4 channels) on the paper's 320-px pictures
    "c": (77, 768),  # SD-1.4's CLIP ViT-L/14 text encoder: 77 tokens of 768
    "blip": (226, 768),  # BLIP's ViT-B/16 at 240 px: 15 x 15 patches and a class token, of 768
    "dpt": (4, 577, 1024),  # DPT-large at 384 px: 4 hooked layers of 24 x 24 patches and a class token, of 1024
    "reconstruction": (512, 512, 3),  # SD-1.4's output at 512 px
}
STEPS = ("prepare", "features", "fit", "reconstruct", "evaluate", "encoding", "app")
# A real subject (subj01), for the disk figures: 37 sessions of 750 trials (the paper's), 10,000 pictures of which
# 982 are test pictures (the shared ones seen in those sessions)
NSD_SUBJECT = {"train_trials": 37 * 750 - 3 * 982, "test_images": 982, "pictures": 10_000}


class StepFailed(RuntimeError):
    """A step of the rehearsal failed, or wrote another shape than the real run's models give."""


@dataclass
class Step:
    """One step of the rehearsal as measured from outside its process."""

    name: str
    command: list[str]
    wall_s: float = 0.0
    peak_rss_gb: float = 0.0
    gpu_peak_gb: float | None = None
    fetched_bytes: int = 0  # from NSD's bucket
    coco_bytes: int = 0  # from COCO's site
    written_bytes: int = 0
    shapes: dict[str, object] = field(default_factory=dict)


# --- the data: one subject at NSD's size ---------------------------------------------------------------------------


def write_full_size_subject(
    root: str | Path,
    sessions: int = 2,
    trials_per_session: int = 750,
    n_shared: int | None = None,
    thickness: float = NSDGENERAL_THICKNESS,
    seed: int = 0,
) -> Path:
    """Subject 1 on NSD's 81 x 104 x 83 grid with NSD-sized ROIs (~16k nsdgeneral voxels), HDF5 betas in NSD's layout
    (one uncompressed chunk per voxel), and a stimuli file of NSD's shape (73,000 x 425 x 425 x 3, one chunk per
    picture) holding only the subject's pictures. ``n_shared`` of them are shared (the test pictures; by default a
    tenth, as NSD's 1,000 of 10,000). Planted features are random (only sizes matter here). Returns ``root``.
    """
    root = Path(root)
    per_subject = -(-sessions * trials_per_session // 3)
    tree = write_nsd_tree(
        root, subjects=(1,), n_sessions=sessions, trials_per_session=trials_per_session,
        n_shared=n_shared or max(1, round(per_subject / 10)), grid_shape=(81, 104, 83), cortex_thickness=thickness,
        features="random", write_hdf5=True, write_nifti=False, image_size=32, seed=seed,
    )  # fmt: skip
    # NSD's stimuli file: all 73k slots, only the subject's pictures written (unwritten chunks take no space); the
    # small pictures are blown up to 425 px (their content is irrelevant to models with random weights)
    with h5py.File(nsd.stimuli_path(root), "r") as f:
        small = f["imgBrick"][:]
    path = nsd.stimuli_path(root).with_suffix(".tmp")
    with h5py.File(path, "w") as f:
        brick = f.create_dataset(
            "imgBrick", shape=(NSD_PICTURES, NSD_SIDE, NSD_SIDE, 3), dtype=np.uint8, chunks=(1, NSD_SIDE, NSD_SIDE, 3)
        )
        scale = -(-NSD_SIDE // small.shape[1])
        for i in np.unique(tree.trial_images[1]):
            brick[i] = np.repeat(np.repeat(small[i], scale, axis=0), scale, axis=1)[:NSD_SIDE, :NSD_SIDE]
    path.replace(nsd.stimuli_path(root))
    return root


# --- measuring a step from outside -----------------------------------------------------------------------------------


def folder_bytes(*folders: Path) -> int:
    return sum(p.stat().st_size for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file())


class GPUWatch:
    """Polls ``nvidia-smi`` for the most GPU memory in use above what was in use when the step started (steps run one
    at a time); None without an NVIDIA GPU."""

    def __init__(self, interval_s: float = 0.2):
        self.interval = interval_s
        self.peak_mib: float | None = 0.0 if shutil.which("nvidia-smi") else None
        self._stop = threading.Event()

    def _used_mib(self) -> float:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return sum(float(line) for line in out.stdout.split() if line.strip().replace(".", "").isdigit())

    def _poll(self) -> None:
        baseline = self._used_mib()
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, self._used_mib() - baseline)

    def __enter__(self) -> GPUWatch:
        if self.peak_mib is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.peak_mib is not None:
            self._stop.set()
            self._thread.join()

    @property
    def peak_gb(self) -> float | None:
        return None if self.peak_mib is None else self.peak_mib / 1024


# Runs a step and records its peak RSS. A forked child's ru_maxrss starts at its parent's RSS (Linux carries the
# pre-exec high-water mark over), so the step is started by this small launcher, whose children's peak is the step's
# own; it passes SIGTERM on to the step (the app) and writes {"maxrss": KiB, "returncode": n}.
LAUNCHER = """import json, resource, signal, subprocess, sys
step = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGTERM, lambda *_: step.terminate())
code = step.wait()
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[1], "w").write(json.dumps({"maxrss": peak, "returncode": code}))
"""


def run_process(command: list[str], env: dict, log: Path, until: Callable[[], object] | None = None):
    """Run ``command``; with ``until``, call it once the process is started and stop the process when it returns.

    Returns (seconds, peak RSS in GB, GPU peak in GB or None, what ``until`` returned). Raises :class:`StepFailed`
    with the log's tail when the process fails.
    """
    usage = log.with_suffix(".usage.json")
    start = time.perf_counter()
    with log.open("w") as out, GPUWatch() as gpu:
        launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(usage), *command], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        answer = None
        try:
            if until is not None:
                answer = until()
        finally:
            if until is not None:
                launcher.terminate()  # a server: stopped once it has answered (or failed to)
            launcher.wait()
        seconds = time.perf_counter() - start
    measured = json.loads(usage.read_text()) if usage.exists() else {"maxrss": 0, "returncode": launcher.returncode}
    stopped = until is not None and measured["returncode"] == -15  # the server, stopped by us
    if measured["returncode"] != 0 and not stopped:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise StepFailed(f"{Path(command[1]).name} failed (exit {measured['returncode']}); the end of {log}:\n{tail}")
    return seconds, measured["maxrss"] / 2**20, gpu.peak_gb, answer


# --- the shapes each step wrote, checked against the real models' ----------------------------------------------------


def check_shape(what: str, shape: tuple, expected: tuple) -> tuple:
    if tuple(shape) != tuple(expected):
        raise StepFailed(f"{what} has shape {tuple(shape)}, where the real run's models give {tuple(expected)}")
    return tuple(shape)


def trials_shapes(data: Path, n_voxels: int) -> dict:
    shapes = {}
    for split in ("train", "test"):
        trials = load_trials(data, 1, split)
        row = trials[0]
        check_shape(f"{split} betas", np.shape(row["betas"]), (n_voxels,))
        check_shape(f"{split} picture", np.asarray(row["image"].convert("RGB")).shape, REAL_SHAPES["picture"])
        shapes[split] = f"{len(trials)} x betas ({n_voxels},), picture {NSD_SIDE} px"
    return shapes


def feature_shapes(features: Path, names: tuple[str, ...], n_images: int) -> dict:
    shapes = {}
    for name in names:
        store = FeatureStore(features, name)
        if len(store.index) != n_images:
            raise StepFailed(f"feature {name} holds {len(store.index)} pictures, where the dataset has {n_images}")
        shapes[name] = check_shape(f"feature {name}", store.feature_shape, REAL_SHAPES[name])
    return shapes


def maps_shapes(maps_dir: Path) -> dict:
    maps = SubjectMaps.from_pretrained(maps_dir)
    shapes = {}
    for name, target in maps.config.targets.items():
        check_shape(f"the {name} map's output", target.shape, REAL_SHAPES[name])
        rank = f", rank {target.rank}" if target.rank else ", dense"
        shapes[name] = f"{target.n_voxels:,} voxels -> {tuple(target.shape)}{rank}"
    return shapes


def reconstruction_shapes(recon: Path, n_trials: int) -> dict:
    folders = sorted((recon / subject_name(1)).glob("test-*"))
    if len(folders) != n_trials:
        raise StepFailed(f"{recon} holds {len(folders)} finished trials, where {n_trials} were asked for")
    for folder in folders:
        _, images = load_trial_images(folder)
        for kind in KINDS:
            names = [n for n in images if n == kind or n.startswith(f"{kind}_")]
            if not names:
                raise StepFailed(f"{folder} has no {kind} image")
            for n in names:
                check_shape(f"{folder.name}/{n}.png", images[n].shape, REAL_SHAPES["reconstruction"])
    return {"trials": n_trials, **{kind: REAL_SHAPES["reconstruction"] for kind in KINDS}}


# --- what the real run needs -----------------------------------------------------------------------------------------


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def checkpoints() -> list[tuple[str, str, int]]:
    """(Hub id, what for, parameters) of every checkpoint the real run downloads, counted on the random twins built
    on the meta device (no memory, no download). torchvision's networks are counted where torchvision imports."""
    with torch.device("meta"):
        sd14, depth = random_sd14_ldm(), random_sd2_depth_ldm()
        captioner, dpt = random_blip_captioner(), random_dpt_large()
        clip = random_clip_l14()
    if states_shape(dpt) != REAL_SHAPES["dpt"] or captioner.embedding_shape != REAL_SHAPES["blip"]:
        raise StepFailed("the random twins no longer have the real models' shapes")
    rows = [
        (TAKAGI2023.model_id, "z, c, Xz/Xc/Xzc/Xzt (VAE, CLIP text, U-Net)",
         sum(_count(m) for m in (sd14.vae, sd14.text_encoder, sd14.unet))),
        (BLIP_MODEL, "blip features, decoded captions", _count(captioner.model)),
        (DPT_MODEL, "dpt features, decoded depth", _count(dpt)),
        (DEPTH_MODEL, "Xztd (VAE, OpenCLIP-H text, 5-channel U-Net)",
         sum(_count(m) for m in (depth.vae, depth.text_encoder, depth.unet))),
        (CLIP_MODEL, "CLIP metric (the vision tower; the file also holds the text tower: 1.7 GB)", _count(clip)),
    ]  # fmt: skip
    try:
        check_torchvision(TORCHVISION_METRICS)
    except InputError:
        return rows
    import torchvision

    for name, what in (("alexnet", "AlexNet(2), AlexNet(5)"), ("inception_v3", "Inception"),
                       ("efficientnet_b1", "EffNet-B"), ("resnet50", "SwAV (ResNet-50, torch.hub)")):  # fmt: skip
        with torch.device("meta"):
            net = torchvision.models.get_model(name, weights=None)
        rows.append((f"torchvision {name}", what, _count(net)))
    return rows


STEP_MODELS = {  # which checkpoints each step holds on the GPU
    "features": (TAKAGI2023.model_id, BLIP_MODEL, DPT_MODEL),
    "reconstruct": (TAKAGI2023.model_id, BLIP_MODEL, DPT_MODEL, DEPTH_MODEL),
    "evaluate": (CLIP_MODEL, "torchvision alexnet", "torchvision inception_v3", "torchvision efficientnet_b1",
                 "torchvision resnet50"),
    "app": (TAKAGI2023.model_id,),
}  # fmt: skip


def needs_table(steps: list[Step], sizes: dict, checkpoint_rows: list[tuple[str, str, int]]) -> str:
    """What the real run needs, as markdown: checkpoints (fp32 download), disk per subject (measured per trial and per
    picture, scaled to a real subject) and each step's GPU memory in fp16 (parameters, and the measured peak)."""
    params = {row[0]: row[2] for row in checkpoint_rows}
    lines = ["| checkpoint | used for | parameters | fp32 (parameters x 4 B) |", "|---|---|---:|---:|"]
    lines += [f"| {cid} | {what} | {n / 1e6:,.0f} M | {byte_size(4 * n)} |" for cid, what, n in checkpoint_rows]
    lines += [f"| all | | {sum(params.values()) / 1e6:,.0f} M | {byte_size(4 * sum(params.values()))} |", ""]
    lines += ["| disk per subject | rehearsal | a real subject (subj01: 27,750 trials, 10,000 pictures) |",
              "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {name} | {byte_size(measured)} | {byte_size(real)} |" for name, (measured, real) in sizes.items()]
    lines += [
        "",
        "| step | fp16 parameters on the GPU | GPU peak measured | CPU peak RSS (fp32) |",
        "|---|---:|---:|---:|",
    ]
    for step in steps:
        held = sum(params.get(cid, 0) for cid in STEP_MODELS.get(step.name, ()))
        gpu = "no GPU here" if step.gpu_peak_gb is None else f"{step.gpu_peak_gb:.1f} GB"
        lines.append(f"| {step.name} | {byte_size(2 * held) if held else '-'} | {gpu} | {step.peak_rss_gb:.1f} GB |")
    return "\n".join(lines)


# --- the rehearsal ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask_app(port: int, strength: float, steps: int, timeout_s: float = 600) -> dict:
    """Wait for the app on ``port``, then load subject 1 and reconstruct its first test trial through the API."""
    from gradio_client import Client
    from PIL import Image

    deadline = time.time() + timeout_s
    while True:
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            break
        except Exception:  # not up yet (connection refused, or the config not served yet)
            if time.time() > deadline:
                raise StepFailed(f"the app did not answer on port {port} within {timeout_s:.0f} s") from None
            time.sleep(2)
    gallery, *_ = client.predict(1, api_name="/load_subject")
    _, xz, xc, xzc, *_ = client.predict(1, 0, strength, "per target", 5.0, steps, 0, 1, api_name="/reconstruct")
    shapes = {}
    for kind, images in (("Xz", xz), ("Xc", xc), ("Xzc", xzc)):
        with Image.open(images[0]["image"]) as image:
            shapes[kind] = check_shape(f"the app's {kind}", np.asarray(image.convert("RGB")).shape,
                                       REAL_SHAPES["reconstruction"])  # fmt: skip
    return {"gallery": len(gallery), **shapes}


def rehearse(
    work: str | Path,
    scripts: str | Path,
    sessions: int = 2,
    trials_per_session: int = 750,
    test_images: int = 2,
    steps: int = 4,
    strength: float = 0.8,
    app_steps: int = 10,
    app_strength: float = 0.1,
    from_step: str | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[list[Step], str]:
    """Rehearse the real run in ``work`` with the scripts in ``scripts`` (and ``app.py`` beside them). Returns the
    measured steps and the needs table. The data are written once and kept; every step runs afresh, or, with
    ``from_step``, the steps before it are skipped and their outputs from the last rehearsal in ``work`` reused."""
    if test_images < 2:
        raise InputError(
            f"test_images must be >= 2 (evaluate's 2-way identification compares pairs), got {test_images}"
        )
    if from_step is not None and from_step not in STEPS:
        raise InputError(f"from_step must be one of {STEPS}, got {from_step!r}")
    work, scripts = Path(work), Path(scripts)
    nsd_root, out = work / "nsd", work / "run"
    if from_step is None and out.exists():
        shutil.rmtree(out)
    skipped = set(STEPS[: STEPS.index(from_step)]) if from_step else set()
    data, features, maps_dir = out / "trials", out / "features", out / "weights" / subject_name(1)
    recon, metrics, encoding, cache, logs = (out / n for n in ("recon", "metrics", "encoding", "cache", "logs"))
    logs.mkdir(parents=True, exist_ok=True)
    python = [sys.executable]
    steps_done: list[Step] = []

    marker = nsd_root / ".complete"
    # a tenth of the pictures are test pictures, as in NSD; at least those reconstructed and those encoding needs
    n_shared = max(test_images, MIN_TEST_IMAGES, round(sessions * trials_per_session / 3 / 10))
    key = json.dumps([sessions, trials_per_session, n_shared, "coco-apart"])  # older trees held COCO's captions
    if not marker.exists() or marker.read_text() != key:
        if nsd_root.exists():
            shutil.rmtree(nsd_root)
        started = time.perf_counter()
        write_full_size_subject(nsd_root, sessions, trials_per_session, n_shared=n_shared)
        marker.write_text(key)
        echo(f"wrote the synthetic subject at NSD's size in {time.perf_counter() - started:.0f} s ({nsd_root})")

    with FolderS3(nsd_root, BUCKET) as bucket, FolderSite(default_coco_root(nsd_root)) as coco_site:
        env = {**os.environ, "AWS_ENDPOINT_URL": bucket.url, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        followup = ",".join(f"{t}={roi}" for t, roi in TAKAGI2023.followup_decoders)
        paper = ",".join(f"{t}={roi}" for t, roi in TAKAGI2023.decoders)
        plan = [
            ("prepare", [str(scripts / "prepare_nsd.py"), "--nsd-root", f"s3://{BUCKET}", "--subject", "1",
                         "--out", str(data), "--cache-dir", str(cache)], (data, cache)),
            ("features", [str(scripts / "extract_features.py"), "--data", str(data), "--subject", "1",
                          "--model", "random-sd14", "--features", "z,c,blip,dpt", "--captioner", "random-blip",
                          "--depth-model", "random-dpt-large", "--out", str(features)], (features,)),
            ("fit", [str(scripts / "fit_maps.py"), "--data", str(data), "--features", str(features), "--subject", "1",
                     "--decoders", f"{paper},{followup}", "--out", str(maps_dir)], (maps_dir,)),
            ("reconstruct", [str(scripts / "reconstruct.py"), "--maps", str(maps_dir), "--data", str(data),
                             "--subject", "1", "--trials", f"0:{test_images}", "--out", str(recon),
                             "--steps", str(steps), "--strength", str(strength), "--rescale", "target",
                             "--depth-ldm", "random-sd2-depth"], (recon,)),
            ("evaluate", [str(scripts / "evaluate.py"), "--recon", str(recon), "--out", str(metrics),
                          "--features", str(features)], (metrics,)),
            ("encoding", [str(scripts / "encoding.py"), "--data", str(data), "--features", str(features),
                          "--subject", "1", "--names", "z", "--roi-voxels", "--out", str(encoding)],
             (encoding,)),
        ]  # fmt: skip
        notes = {}
        try:
            check_torchvision(TORCHVISION_METRICS)
        except InputError as err:
            plan[4][1].extend(["--metrics", ",".join(m for m in METRICS if m not in TORCHVISION_METRICS)])
            notes["evaluate"] = f"  AlexNet(2), AlexNet(5), Inception, EffNet-B and SwAV skipped: {err}"

        for name, command, outputs in plan:
            if name in skipped:
                echo(f"[{name}] skipped: the outputs of the last rehearsal in {out} are reused")
                continue
            step = Step(name, python + command)
            echo(f"[{name}] {' '.join(Path(c).name if c.startswith(str(scripts)) else c for c in command)}")
            if name in notes:
                echo(notes[name])
            bucket.reset()
            coco_site.reset()
            before = folder_bytes(*outputs)
            # COCO's URL (http://images.cocodataset.org/...) reaches the stand-in as through a proxy, so prepare runs
            # as the README writes it, as AWS_ENDPOINT_URL sends s3://natural-scenes-dataset to the local bucket
            coco = {"http_proxy": coco_site.url, "no_proxy": "127.0.0.1,localhost"} if name == "prepare" else {}
            step.wall_s, step.peak_rss_gb, step.gpu_peak_gb, _ = run_process(
                step.command, {**env, **coco}, logs / f"{name}.log"
            )
            step.fetched_bytes = sum(bucket.bytes_sent.values())
            step.coco_bytes = coco_site.fetched()
            step.written_bytes = folder_bytes(*outputs) - before
            step.shapes = _shapes(name, out, data, features, maps_dir, recon, metrics, encoding, test_images)
            steps_done.append(step)
            echo(describe(step))

        port = _free_port()
        app = Step("app", python + [str(scripts.parent / "app.py"), "--maps", str(maps_dir.parent), "--data",
                                    str(data), "--port", str(port)])  # fmt: skip
        echo(f"[app] app.py on port {port}, one reconstruction through /reconstruct")
        app.wall_s, app.peak_rss_gb, app.gpu_peak_gb, app.shapes = run_process(
            app.command, env, logs / "app.log", until=lambda: _ask_app(port, app_strength, app_steps)
        )
        steps_done.append(app)
        echo(describe(app))

    n_train, n_test = len(load_trials(data, 1, "train")), len(load_trials(data, 1, "test"))
    n_pictures = len(FeatureStore(features, "z").index)
    per_trial = folder_bytes(data) / (n_train + n_test)
    sizes = {
        "trials dataset": (folder_bytes(data), per_trial * (NSD_SUBJECT["train_trials"] + NSD_SUBJECT["test_images"]))
    }
    for name in ("z", "c", "blip", "dpt"):
        stored = folder_bytes(features / name)
        sizes[f"features {name}"] = (stored, stored / n_pictures * NSD_SUBJECT["pictures"])
    sizes["maps (z, c, blip, dpt; c dense)"] = (folder_bytes(maps_dir), folder_bytes(maps_dir))
    per_image = folder_bytes(recon / subject_name(1)) / test_images
    sizes["reconstructions (1 sample a test image)"] = (per_image * test_images, per_image * NSD_SUBJECT["test_images"])
    return steps_done, needs_table(steps_done, sizes, checkpoints())


def _shapes(name, out, data, features, maps_dir, recon, metrics, encoding, test_images) -> dict:
    if name == "prepare":
        return trials_shapes(data, len(load_voxels(data, 1).ijk))
    if name == "features":
        ids = {*load_trials(data, 1, "train")["nsd_id"], *load_trials(data, 1, "test")["nsd_id"]}
        return feature_shapes(features, ("z", "c", "blip", "dpt"), len(ids))
    if name == "fit":
        return maps_shapes(maps_dir)
    if name == "reconstruct":
        return reconstruction_shapes(recon, test_images)
    if name == "evaluate":
        scored = json.loads((metrics / "metrics.json").read_text())["subjects"][subject_name(1)]
        names = {tuple(sorted(values)) for values in scored.values()}
        if set(scored) != set(KINDS) or len(names) != 1:
            raise StepFailed(f"{metrics / 'metrics.json'} scores {sorted(scored)}, not each of {KINDS} alike")
        missing = [f"{kind} {m}" for kind, values in scored.items() for m, v in values.items() if v is None]
        if missing:
            raise StepFailed(f"{metrics / 'metrics.json'} has no value for {', '.join(missing)}")
        return {"kinds": ", ".join(scored), "metrics": ", ".join(names.pop())}
    return {"files": ", ".join(sorted(p.name for p in encoding.rglob("*") if p.is_file())[:6])}


def describe(step: Step) -> str:
    gpu = "" if step.gpu_peak_gb is None else f", GPU peak {step.gpu_peak_gb:.1f} GB"
    shapes = "; ".join(f"{k} {v}" for k, v in step.shapes.items())
    return (
        f"  {step.name}: {step.wall_s:.0f} s, peak RSS {step.peak_rss_gb:.1f} GB{gpu}, fetched "
        f"{byte_size(step.fetched_bytes)} from NSD's bucket and {byte_size(step.coco_bytes)} from COCO's site, wrote "
        f"{byte_size(step.written_bytes)}; {shapes}"
    )


def steps_table(steps: list[Step]) -> str:
    lines = [
        "| step | wall | peak RSS | GPU peak | from NSD | from COCO | written | shapes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        gpu = "—" if s.gpu_peak_gb is None else f"{s.gpu_peak_gb:.1f} GB"
        shapes = "; ".join(f"{k} {v}" for k, v in s.shapes.items())
        lines.append(
            f"| {s.name} | {s.wall_s:.0f} s | {s.peak_rss_gb:.1f} GB | {gpu} | {byte_size(s.fetched_bytes)} | "
            f"{byte_size(s.coco_bytes)} | {byte_size(s.written_bytes)} | {shapes} |"
        )
    return "\n".join(lines)
