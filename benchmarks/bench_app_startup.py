#!/usr/bin/env python
"""Benchmark the app's start-up for one subject: the time and peak memory of loading its maps and test split.

Builds once, in --work, a synthetic subject whose test split has --test-images images (NSD: about 1,000) at NSD's
stimulus size. It prepares the subject, extracts toy z and c, and fits the maps. Then, in a fresh process per
setting, it times `DemoBackend.subject(1)`: loading the test split, decoding z and c from the betas, and encoding
the true features. It reports the process's peak RSS and how much of it loading adds (Linux). `--batch-sizes`
sets how many test images are encoded at a time; 0 means all at once, as the demo did before.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def build(work: Path, test_images: int, image_size: int) -> None:
    from brainldm.data import SubjectStimuli, prepare_subject
    from brainldm.features import extract_features, parse_features
    from brainldm.ldm import load_ldm
    from brainldm.maps import fit_subject_maps
    from brainldm.synthetic import write_nsd_tree

    if (work / "weights" / "subj01" / "maps.safetensors").exists():
        return
    ldm = load_ldm("toy", device="cpu")
    per_subject = test_images + 100  # the test images plus 100 training images, each shown three times
    trials = 3 * per_subject
    sessions = 10
    tree = write_nsd_tree(work / "nsd", (1,), n_sessions=sessions, trials_per_session=-(-trials // sessions),
                          n_shared=test_images, image_size=image_size, ldm=ldm, seed=0)  # fmt: skip
    prepare_subject(tree.root, 1, work / "trials")
    stimuli = SubjectStimuli(work / "trials", 1)
    extract_features(ldm, "toy", stimuli.nsd_ids, stimuli.__getitem__, parse_features("z,c"), work / "features")
    fit_subject_maps(work / "trials", work / "features", 1, device="cpu").save_pretrained(work / "weights" / "subj01")


def measure(work: Path, batch_size: int) -> dict:
    """Run in a fresh process: peak RSS before and after loading subject 1, and the time it took."""
    import resource

    from brainldm.demo import DemoBackend, Sources

    sources = Sources(str(work / "weights"), str(work / "trials"), "toy", [1])
    backend = DemoBackend(sources, device="cpu", batch_size=batch_size or 10**9)
    backend._load_ldm("toy")
    # the resident set now (not the peak so far: loading the model may have passed through a higher one)
    status = Path("/proc/self/status").read_text()
    before = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024
    start = time.perf_counter()
    subject = backend.subject(1)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"test_images": len(subject), "batch_size": batch_size, "seconds": seconds, "added_peak_mb": after - before,
            "peak_mb": after}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/brainldm-bench-app", help="where the synthetic subject is built")
    parser.add_argument("--test-images", type=int, default=1000, help="test split size (default: 1000, NSD's)")
    parser.add_argument("--image-size", type=int, default=425, help="stimulus size (default: 425, NSD's)")
    parser.add_argument("--batch-sizes", default="32,0", help="encoding batch sizes to compare (0: all at once)")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # the child process's mode
    args = parser.parse_args(argv)
    work = Path(args.work)
    if args.measure is not None:
        print(json.dumps(measure(work, args.measure)))
        return
    start = time.perf_counter()
    build(work, args.test_images, args.image_size)
    print(f"built the subject in {time.perf_counter() - start:.0f} s (cached in {work})")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        run = subprocess.run([sys.executable, __file__, "--work", str(work), "--measure", str(batch_size)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        result = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"batch size {batch_size or 'all'}: {result['test_images']} test images loaded in "
            f"{result['seconds']:.1f} s, peak RSS {result['peak_mb']:.0f} MB "
            f"({result['added_peak_mb']:+.0f} MB over the process with its model loaded)"
        )


if __name__ == "__main__":
    main()
