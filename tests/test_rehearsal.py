"""The real run rehearsed at full size (scripts/rehearse.py), small enough for the suite: one session of a subject on
NSD's 81 x 104 x 83 grid with NSD-sized ROIs, served from a local S3 bucket; every model at its real architecture with
random weights; one test image, one denoising step. A step that fails or writes a shape the real models would not
stops the rehearsal, so this test fails."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from brainldm.offline.rehearsal import REAL_SHAPES, StepFailed, rehearse, run_process, steps_table

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    work = tmp_path_factory.mktemp("rehearsal")
    lines = []
    steps, needs = rehearse(
        work, SCRIPTS, sessions=1, trials_per_session=30, test_images=2, steps=2, strength=0.5, app_steps=10,
        app_strength=0.1, echo=lines.append,
    )  # fmt: skip
    return work, {step.name: step for step in steps}, needs, lines


@pytest.mark.rehearsal  # 18 minutes on 2 cores: its own CI line, -m rehearsal
def test_every_step_of_the_real_pipeline_runs_at_the_real_sizes(rehearsal):
    work, steps, _, lines = rehearsal
    assert list(steps) == ["prepare", "features", "fit", "reconstruct", "evaluate", "encoding", "app"]
    assert steps["prepare"].fetched_bytes > 0  # the data came through the S3 endpoint
    assert 0 < steps["prepare"].coco_bytes  # and the captions from COCO's stand-in, by range requests: not the whole
    assert (
        steps["prepare"].coco_bytes
        < (work / "nsd-coco" / "annotations" / "annotations_trainval2017.zip").stat().st_size
    )
    assert all(step.coco_bytes == 0 for name, step in steps.items() if name != "prepare")
    assert steps["prepare"].shapes["train"].startswith("18 x betas (16") and "425 px" in steps["prepare"].shapes["test"]
    assert steps["features"].shapes == {name: REAL_SHAPES[name] for name in ("z", "c", "blip", "dpt")}
    assert steps["fit"].shapes["z"].endswith("(4, 40, 40), dense") and "rank" in steps["fit"].shapes["dpt"]
    assert all(steps["reconstruct"].shapes[kind] == (512, 512, 3) for kind in ("Xz", "Xc", "Xzc", "Xzt", "Xztd"))
    assert steps["app"].shapes["Xzc"] == (512, 512, 3)
    assert all(step.wall_s > 0 and step.peak_rss_gb > 0 for step in steps.values())
    assert steps["features"].peak_rss_gb > 2  # SD-1.4, BLIP and DPT-large in fp32 on the CPU
    table = steps_table(list(steps.values()))
    assert table.count("\n") == 1 + len(steps)


@pytest.mark.rehearsal  # 18 minutes on 2 cores: its own CI line, -m rehearsal
def test_the_needs_table_names_every_checkpoint_and_the_disk_a_subject_takes(rehearsal):
    _, _, needs, _ = rehearsal
    for checkpoint in ("CompVis/stable-diffusion-v1-4", "Salesforce/blip-image-captioning-base", "Intel/dpt-large",
                       "stabilityai/stable-diffusion-2-depth", "openai/clip-vit-large-patch14"):  # fmt: skip
        assert f"| {checkpoint} |" in needs
    assert "| CompVis/stable-diffusion-v1-4 | z, c, Xz/Xc/Xzc/Xzt (VAE, CLIP text, U-Net) | 1,066 M | 4.3 GB |" in needs
    disk = {line.split("|")[1].strip(): line.split("|")[2:4] for line in needs.splitlines() if "B |" in line}
    assert {"trials dataset", "features z", "features c", "features blip", "features dpt"} <= set(disk)
    # DPT's hidden states in float16: 4 x 577 x 1024 x 2 bytes a picture, 47 GB for a real subject's 10,000
    assert disk["features dpt"][1].strip() == "47.3 GB"


def test_a_step_is_measured_on_its_own_and_a_failing_step_stops_the_rehearsal(tmp_path):
    ballast = np.ones(2**28, np.uint8)  # 256 MB in this process, which a forked child's own peak must not count
    seconds, peak_gb, _, _ = run_process([sys.executable, "-c", "pass"], {}, tmp_path / "quiet.log")
    assert ballast.sum() == 2**28 and 0 < peak_gb < 0.2 and seconds > 0
    with pytest.raises(StepFailed, match=r"(?s)failed \(exit 3\).*what went wrong"):
        run_process([sys.executable, "-c", "import sys; print('what went wrong'); sys.exit(3)"], {}, tmp_path / "x.log")
