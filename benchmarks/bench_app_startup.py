#!/usr/bin/env python
"""Benchmark the app's start-up for one subject: the time and peak memory of loading its maps and test split.

Builds once per size, in --work, a synthetic subject whose test split has that many images (NSD: about 1,000) at
NSD's stimulus size: it prepares the subject, extracts toy z and c, and fits the maps. Then, in a fresh process
per size, it times `DemoBackend.subject(1)` (maps and test split), the subject's first gallery (thumbnails, made
once) and one trial's decoding, and reports the process's peak RSS and how much of it they add (Linux).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def build(work: Path, test_images: int, image_size: int) -> None:
    from brainldm.ldm.loading import load_ldm
    from brainldm.offline.world import build_offline_world

    if (work / "weights" / "subj01" / "maps.safetensors").exists():
        return
    per_subject = test_images + 100  # the test images plus 100 training images, each shown three times
    sessions = 10
    world = build_offline_world(
        work, load_ldm("toy", device="cpu"), "toy", n_sessions=sessions, n_shared=test_images, image_size=image_size,
        trials_per_session=-(-3 * per_subject // sessions), seed=0, progress=True,
    )  # fmt: skip
    world.maps[1].save_pretrained(work / "weights" / "subj01")


def measure(work: Path) -> dict:
    """Run in a fresh process: the time and added peak RSS of loading subject 1, of its first gallery (thumbnails
    written once), and of decoding one trial's z and c."""
    from brainldm.demo import DemoBackend, Sources

    def status_mb(field: str) -> float:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1]) / 1024

    sources = Sources(str(work / "weights"), str(work / "trials"), "toy", [1])
    backend = DemoBackend(sources, device="cpu")  # loads the model
    # reset the peak to the resident set now, so the peak below is what the subject adds (Linux: clear_refs 5)
    Path("/proc/self/clear_refs").write_text("5")
    before = status_mb("VmRSS:")
    times = {}
    start = time.perf_counter()
    subject = backend.subject(1)
    times["load"] = time.perf_counter() - start
    start = time.perf_counter()
    backend.gallery(1)
    times["gallery"] = time.perf_counter() - start
    start = time.perf_counter()
    subject.decode(len(subject) - 1)
    times["decode"] = time.perf_counter() - start
    after = status_mb("VmHWM:")
    return {"test_images": len(subject), **times, "added_peak_mb": after - before, "peak_mb": after}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/brainldm-bench-app", help="where the synthetic subjects are built")
    parser.add_argument(
        "--test-images", default="100,1000", help="test split sizes to compare (default: 100 and NSD's 1,000)"
    )
    parser.add_argument("--image-size", type=int, default=425, help="stimulus size (default: 425, NSD's)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process's mode: a built subject's folder
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(Path(args.measure))))
        return
    for n in (int(n) for n in args.test_images.split(",")):
        work = Path(args.work) / f"test{n}"
        start = time.perf_counter()
        build(work, n, args.image_size)
        print(f"built the subject with {n} test images in {time.perf_counter() - start:.0f} s (cached in {work})")
        run = subprocess.run([sys.executable, __file__, "--measure", str(work)], capture_output=True, text=True,
                             check=True)  # fmt: skip
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"{r['test_images']} test images: subject loaded in {r['load']:.2f} s, first gallery (thumbnails) "
            f"{r['gallery']:.1f} s, one trial decoded in {r['decode']:.3f} s; peak RSS {r['peak_mb']:.0f} MB "
            f"({r['added_peak_mb']:+.0f} MB over the process with its model loaded)"
        )


if __name__ == "__main__":
    main()
