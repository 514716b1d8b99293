#!/usr/bin/env python
"""Benchmark preparing an NSD subject straight from an S3 bucket: what it fetches, how many requests, how long, how
much memory; and the same subject prepared from the local folder, compared bit for bit.

Writes (or reuses) a full-size synthetic subject: NSD's 81 x 104 x 83 grid, SESSIONS x 750 trials as HDF5 betas in
NSD's layout (one uncompressed chunk per voxel), ~16k stored voxels (subj01's nsdgeneral holds 15,724), and a stimuli
file of NSD's shape (73,000 x 425 x 425 x 3, one chunk per picture) holding only the pictures the subject saw. Serves
the folder as an S3 bucket on 127.0.0.1 (brainldm.offline.bucket; --latency-ms adds S3-like round trips), prepares
subject 1 from it in a child process, and extrapolates to a real subject (40 sessions, 10,000 pictures).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

REAL = {  # a real subject (subj01), for the extrapolation
    "sessions": 40,
    "pictures": 10_000,
    "session_bytes": 81 * 104 * 83 * 750 * 2,  # int16 betas of one func1pt8mm session
    # whole files fetched once: stim info, design, 2 ROIs; and from COCO's site, not NSD's bucket, the two caption
    # members of its archive (at most their unpacked 91.9 MB + 3.9 MB: fewer bytes as fetched, compressed)
    "small_bytes": 91.9e6 + 3.9e6 + 16e6 + 1e6 + 2e6,
    "download_first": 77e9,  # ~40 GB of betas + the 37 GB stimuli file
}


def _prepare(root: str, out: str, cache: str, endpoint: str | None, peak, coco: str) -> None:
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from brainldm.data.trials import prepare_subject

    prepare_subject(root, 1, out, overwrite=True, cache_dir=cache, progress=False, coco_annotations=coco)
    peak.value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the child's own, after exec


def run_child(root: str, out: Path, cache: Path, coco: Path, endpoint: str | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of preparing subject 1 in a fresh process, captions from the local ``coco``
    archive (what is measured here is what comes from NSD's bucket)."""
    context = multiprocessing.get_context("spawn")
    peak = context.Value("d", 0.0)
    start = time.perf_counter()
    child = context.Process(target=_prepare, args=(root, str(out), str(cache), endpoint, peak, str(coco)))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"prepare failed with exit code {child.exitcode}")
    return time.perf_counter() - start, peak.value


def same_files(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def files(folder: Path) -> dict:
        found = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        for name in [n for n in found if n.endswith(".safetensors")]:  # its metadata keys come in any order
            with safe_open(folder / name, framework="numpy") as f:
                found[name] = (f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()})
        return found

    return files(a) == files(b)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", help="synthetic NSD root to use or create (default: a temp folder)")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--cortex-thickness", type=float, default=0.032, help="ROI shell depth (0.032 -> ~16k voxels)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every S3 answer")
    args = parser.parse_args(argv)

    from brainldm.data import nsd
    from brainldm.data.readers import nsd_voxel_table
    from brainldm.offline.bucket import FolderS3
    from brainldm.offline.rehearsal import write_full_size_subject
    from brainldm.offline.synthetic import COCO_PATH, default_coco_root

    tree = Path(args.tree or tempfile.mkdtemp(prefix="bench-nsd-remote-"))
    if not nsd.betas_path(tree, 1, args.sessions, ".hdf5").exists():
        start = time.perf_counter()
        write_full_size_subject(tree, args.sessions, n_shared=100, thickness=args.cortex_thickness)
        print(f"wrote the synthetic subject to {tree} in {time.perf_counter() - start:.0f} s")
    work = Path(tempfile.mkdtemp(prefix="bench-remote-out-"))
    coco = default_coco_root(tree) / COCO_PATH
    n_voxels = len(nsd_voxel_table(tree, 1).ijk)

    with FolderS3(tree, "natural-scenes-dataset", latency_ms=args.latency_ms) as s3:
        wall, peak = run_child("s3://natural-scenes-dataset", work / "remote", work / "cache", coco, s3.url)
        sent, requests = dict(s3.bytes_sent), dict(s3.requests)
    local_wall, _ = run_child(str(tree), work / "local", work / "cache", coco)
    identical = same_files(work / "remote", work / "local")

    session_keys = [nsd.betas_file(1, s, ".hdf5") for s in range(1, args.sessions + 1)]
    session_size = np.mean([(tree / k).stat().st_size for k in session_keys])
    per_session = np.mean([sent.get(k, 0) for k in session_keys])
    per_session_requests = np.mean([requests.get(k, 0) for k in session_keys])
    n_pictures = len(list((work / "cache").rglob("nsd_stimuli.hdf5.images/*.npy")))
    stimuli = sent.get(nsd.STIMULI, 0)
    small = sum(n for k, n in sent.items() if k not in session_keys and k != nsd.STIMULI)
    total = sum(sent.values())
    fraction = per_session / session_size
    real = (
        REAL["sessions"] * fraction * REAL["session_bytes"]
        + REAL["pictures"] * stimuli / max(n_pictures, 1)
        + REAL["small_bytes"]
    )
    print(
        f"prepare from s3:// (local server, {args.latency_ms:g} ms added per request): {args.sessions} sessions x 750 "
        f"trials, grid 81 x 104 x 83, {n_voxels:,} stored voxels, {n_pictures:,} pictures\n"
        f"  betas: {per_session / 2**20:.1f} MiB and {per_session_requests:,.0f} requests per session, "
        f"{fraction:.2%} of the {session_size / 2**30:.2f} GiB session file (goal <= 5%); "
        f"the voxels' own trials are {n_voxels * 1500 / session_size:.2%}\n"
        f"  pictures: {stimuli / 2**20:.0f} MiB ({stimuli / max(n_pictures, 1) / 1e3:.0f} kB each) in "
        f"{requests.get(nsd.STIMULI, 0):,} requests; small files {small / 2**20:.2f} MiB\n"
        f"  in all {total / 2**30:.2f} GiB in {sum(requests.values()):,} requests; wall {wall:.0f} s "
        f"(local folder: {local_wall:.0f} s); peak RSS {peak:.2f} GB\n"
        f"  remote and local prepares identical: {identical}\n"
        f"  a real subject (40 sessions, 10,000 pictures, ~115 MB of small files): ~{real / 1e9:.1f} GB fetched, "
        f"against ~{REAL['download_first'] / 1e9:.0f} GB for a download-first user "
        f"({real / REAL['download_first']:.1%})"
    )


if __name__ == "__main__":
    main()
