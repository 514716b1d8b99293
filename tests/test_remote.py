"""NSD without the download: a subject prepared straight from an S3 bucket (moto's real S3 server on 127.0.0.1,
objects public-read, read anonymously) equals the one prepared from a local copy, fetching only what it needs."""

import importlib.util
import os
import re
import socket
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nsd_listing import as_subj01, listed_keys
from s3_server import LocalS3
from safetensors import safe_open

from brainldm.data import coco, nsd
from brainldm.data.readers import nsd_voxel_table
from brainldm.data.trials import VOXELS_FILE, prepare_subject
from brainldm.offline.site import FolderSite
from brainldm.offline.synthetic import COCO_PATH, write_nsd_tree
from brainldm.validation import InputError

BUCKET = "natural-scenes-dataset"
URL = f"s3://{BUCKET}"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def s3():
    """The S3 server, with this module's AWS settings: its endpoint, no credentials (anonymous reads)."""
    saved = dict(os.environ)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(key, None)
    with LocalS3() as server:
        os.environ.update(
            AWS_ENDPOINT_URL=server.url, AWS_DEFAULT_REGION="us-east-1", AWS_SHARED_CREDENTIALS_FILE="/nonexistent"
        )
        yield server
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def coco_site(nsd_tree):
    """COCO's site, serving the session's world's annotations archive (range requests answered)."""
    with FolderSite(nsd_tree.coco_root) as site:
        site.archive = f"{site.url}/{COCO_PATH}"
        yield site


@pytest.fixture(autouse=True)
def fresh_log(s3, coco_site):
    """Each test sees only its own requests and failures."""
    s3.requests.clear()
    s3.failures.clear()
    coco_site.reset()


@pytest.fixture(scope="module")
def bucket(s3, nsd_tree):
    """The session's synthetic NSD tree (NIfTI betas and their HDF5 twins) as NSD's bucket."""
    s3.upload_tree(nsd_tree.root, BUCKET)
    return nsd_tree


@pytest.fixture(scope="module")
def nsd_sized(s3, tmp_path_factory):
    """Sessions of NSD's shape where bytes are concerned: 750 trials per voxel chunk, rows of 81 voxels, HDF5 betas
    only, and a compact ROI of 2.5% of the grid (subj01's stored voxels are ~2.3% of its grid); in its own bucket."""
    root = tmp_path_factory.mktemp("nsd-sized")
    tree = write_nsd_tree(
        root, n_sessions=2, trials_per_session=750, n_shared=20, grid_shape=(81, 16, 10), features="random",
        write_hdf5=True, write_nifti=False, image_size=16, seed=0,
    )  # fmt: skip
    streams = np.zeros(tree.grid_shape, dtype=np.int16)  # all brain, one early-visual block: x 20-39, y 0-3, z 0-3
    streams[20:40, :4, :4] = nsd.STREAM_IDS["early"]
    for name in ("streams", "nsdgeneral"):
        nib.save(nib.Nifti1Image(streams, np.eye(4)), nsd.roi_path(root, 1, name))
    s3.upload_tree(root, "nsd-sized")
    return tree


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; the voxel table by content (safetensors writes its metadata keys in arbitrary order)."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    for name in [n for n in files if n.endswith(VOXELS_FILE)]:
        with safe_open(folder / name, framework="numpy") as f:
            files[name] = (f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()})
    return files


def _caption_members_bytes(archive: Path) -> int:
    with zipfile.ZipFile(archive) as z:
        return sum(i.compress_size for i in z.infolist() if "/captions_" in i.filename)


def test_remote_prepare_equals_the_local_one_bit_for_bit(bucket, s3, coco_site, tmp_path):
    """NSD from its bucket, which holds no COCO annotations; the captions from COCO's site by range requests."""
    listed = s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]
    assert not [o["Key"] for o in listed if "annotations" in o["Key"] or "captions" in o["Key"]]
    local = prepare_subject(bucket.root, 1, tmp_path / "local", progress=False, coco_annotations=bucket.coco_archive)
    remote = prepare_subject(URL, 1, tmp_path / "remote", progress=False, cache_dir=tmp_path / "cache",
                             coco_annotations=coco_site.archive)  # fmt: skip
    assert _files(remote) == _files(local)
    opened = {as_subj01(r.key) for r in s3.requests if r.method in ("GET", "HEAD") and r.key}
    assert not sorted(opened - listed_keys())  # every key fetched is one NSD's bucket has (tests/data/nsd_listing.json)
    members = _caption_members_bytes(bucket.coco_archive)
    assert members <= coco_site.fetched() < members + coco.TAIL + 4 * coco.BLOCK  # the two caption members only
    assert _files(tmp_path / "remote") == _files(tmp_path / "local")  # the dataset card too
    keys = {r.key for r in s3.requests if r.method == "GET"}
    assert not any(k.endswith(".nii.gz") and "betas_session" in k for k in keys)  # never the NIfTI when HDF5 exists
    assert not any("subj02" in k for k in keys)  # nothing of the other subject
    # only the pictures subject 1 saw: they are what the cache holds, and what was fetched of the stimuli file
    cached = sorted(int(p.stem) for p in (tmp_path / "cache").rglob("nsd_stimuli.hdf5.images/*.npy"))
    assert cached == sorted(set(bucket.trial_images[1].tolist()))
    picture, metadata = 128 * 128 * 3, 512 * 1024  # metadata: HDF5 header and chunk index, read in 64 kB blocks
    assert len(cached) * picture <= s3.fetched("nsd_stimuli.hdf5") < len(cached) * picture + metadata


def test_a_second_run_fetches_no_file_again(bucket, s3, coco_site, tmp_path):
    prepare_subject(
        URL, 2, tmp_path / "a", progress=False, cache_dir=tmp_path / "cache", coco_annotations=coco_site.archive
    )
    first = s3.fetched("")
    s3.requests.clear()
    coco_site.reset()
    prepare_subject(
        URL, 2, tmp_path / "b", progress=False, cache_dir=tmp_path / "cache", coco_annotations=coco_site.archive
    )
    for small in ("nsd_expdesign.mat", "nsd_stim_info_merged.csv", "roi/", "nsd_stimuli.hdf5"):
        assert s3.fetched(small) == 0, small  # small files and pictures come from the cache
    assert coco_site.fetched() == 0  # and the captions
    assert s3.fetched("") < 0.5 * first  # what is left: the betas, which the trials dataset holds anyway


def test_betas_fetched_are_a_few_percent_of_each_session(nsd_sized, s3, tmp_path):
    prepare_subject("s3://nsd-sized", 1, tmp_path, progress=False, cache_dir=tmp_path / "cache",
                    coco_annotations=nsd_sized.coco_archive)  # fmt: skip
    n_voxels = len(nsd_voxel_table(nsd_sized.root, 1).ijk)
    for session in (1, 2):
        key = nsd.betas_file(1, session, ".hdf5")
        size = (nsd_sized.root / key).stat().st_size
        fetched = s3.fetched(key)
        assert n_voxels * 750 * 2 <= fetched <= 0.05 * size, (fetched, size)  # the voxels' trials, and not 5% more
        requests = sum(r.method == "GET" and r.key == key for r in s3.requests)
        assert requests < n_voxels / 4  # voxel chunks travel together, not one request each


def _killed_at_session_2(monkeypatch):
    """Make the prepare die while reading session 2, as a killed run does; returns the real reader, to restore."""
    real_read = nsd.read_betas

    def dying_read(root, subject, session, ijk):
        if session == 2:
            raise KeyboardInterrupt
        return real_read(root, subject, session, ijk)

    monkeypatch.setattr(nsd, "read_betas", dying_read)
    return real_read


def test_a_killed_remote_prepare_resumes_without_fetching_finished_sessions(nsd_sized, s3, tmp_path, monkeypatch):
    real_read = _killed_at_session_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare_subject("s3://nsd-sized", 1, tmp_path / "out", progress=False, cache_dir=tmp_path / "cache",
                        coco_annotations=nsd_sized.coco_archive)  # fmt: skip
    first = s3.fetched(nsd.betas_file(1, 1, ".hdf5"))
    s3.requests.clear()
    monkeypatch.setattr(nsd, "read_betas", real_read)
    prepare_subject("s3://nsd-sized", 1, tmp_path / "out", progress=False, cache_dir=tmp_path / "cache",
                        coco_annotations=nsd_sized.coco_archive)  # fmt: skip
    # session 1's voxels are not fetched again: only its header is read, to check the grid (one metadata block)
    assert s3.fetched(nsd.betas_file(1, 1, ".hdf5")) <= 64 * 1024 < first
    assert s3.fetched(nsd.betas_file(1, 2, ".hdf5")) > 0
    assert (tmp_path / "out" / "subj01" / "info.json").exists()


def test_a_transient_failure_is_retried(bucket, s3, coco_site, tmp_path):
    s3.fail("betas_session02.hdf5", status=503, code="ServiceUnavailable", times=2)
    s3.fail("nsd_expdesign.mat", status=500, code="InternalError", times=1)
    prepare_subject(
        URL, 1, tmp_path, progress=False, sessions=2, cache_dir=tmp_path / "cache", coco_annotations=coco_site.archive
    )
    statuses = [r.status for r in s3.requests if r.key.endswith("betas_session02.hdf5")]
    assert statuses[:2] == [503, 503] and statuses[2] in (200, 206)
    assert (tmp_path / "subj01").is_dir()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "case, match",
    [
        ("bucket", "s3://no-such-bucket does not exist"),
        ("refused", "could not fetch s3://natural-scenes-dataset: .*check the network"),
        ("missing", "missing subj01 streams ROI: s3://natural-scenes-dataset/.*streams.nii.gz does not exist"),
        ("denied", "access to s3://natural-scenes-dataset/.*nsd_stim_info_merged.csv was denied"),
    ],
)
def test_a_bad_source_ends_in_one_clear_error_within_seconds(bucket, s3, coco_site, tmp_path, monkeypatch, case, match):
    root = URL
    if case == "bucket":
        root = "s3://no-such-bucket"
    elif case == "refused":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    elif case == "missing":
        s3.client().delete_object(Bucket=BUCKET, Key=nsd.roi_file(1, "streams"))
    else:  # a private object: moto refuses it to anonymous readers, as S3 does
        s3.client().put_object_acl(Bucket=BUCKET, Key=nsd.STIM_INFO, ACL="private")
    start = time.monotonic()
    with pytest.raises(InputError, match=match):
        prepare_subject(root, 1, tmp_path / "out", progress=False, cache_dir=tmp_path / "cache",
                        coco_annotations=coco_site.archive)  # fmt: skip
    assert time.monotonic() - start < 60  # never a hang: bounded retries, then the error
    assert not (tmp_path / "out").exists()
    if case == "missing":
        s3.client().upload_file(
            str(bucket.root / nsd.roi_file(1, "streams")), BUCKET, nsd.roi_file(1, "streams"),
            ExtraArgs={"ACL": "public-read"},
        )  # fmt: skip
    if case == "denied":
        s3.client().put_object_acl(Bucket=BUCKET, Key=nsd.STIM_INFO, ACL="public-read")


def test_the_script_reads_a_bucket_and_says_what_it_fetched(bucket, s3, coco_site, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_nsd", SCRIPTS / "prepare_nsd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--nsd-root", URL, "--subject", "1", "--sessions", "1", "--out", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache"), "--coco-annotations", coco_site.archive])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(rf"fetched [\d.]+ [kMG]B in .* requests from {URL}\n", out)
    assert re.search(rf"fetched [\d.]+ [kMG]B in .* requests from {re.escape(coco_site.archive)}\n", out)
    assert (tmp_path / "out" / "subj01" / "info.json").exists()
    with pytest.raises(SystemExit) as exit:
        module.main(["--nsd-root", "s3://no-such-bucket", "--subject", "1", "--out", str(tmp_path / "bad")])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: s3://no-such-bucket does not exist") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "bad").exists()


def test_stimuli_from_a_bucket_match_the_file(bucket, s3, tmp_path):
    ids = np.unique(bucket.trial_images[1])[:5]
    from brainldm.data.storage import Storage

    with nsd.Stimuli(Storage(URL, cache_dir=tmp_path), ids) as remote, nsd.Stimuli(bucket.root) as local:
        for i in ids:
            np.testing.assert_array_equal(remote[i], local[i])


def test_without_hdf5_twins_the_nifti_is_streamed(bucket, s3, tmp_path):
    s3.client().create_bucket(Bucket="nifti-only")
    for path in sorted(p for p in bucket.root.rglob("*") if p.is_file()):
        if not (path.name.startswith("betas_session") and path.name.endswith(".hdf5")):
            key = path.relative_to(bucket.root).as_posix()
            s3.client().upload_file(str(path), "nifti-only", key, ExtraArgs={"ACL": "public-read"})
    local = prepare_subject(
        bucket.root, 1, tmp_path / "local", sessions=1, progress=False, coco_annotations=bucket.coco_archive
    )
    remote = prepare_subject("s3://nifti-only", 1, tmp_path / "remote", sessions=1, progress=False,
                             coco_annotations=bucket.coco_archive,
                             cache_dir=tmp_path / "cache")  # fmt: skip
    assert _files(remote) == _files(local)
    assert s3.fetched("betas_session01.nii.gz") > 0


# --- a cache that never serves stale data ------------------------------------------------------------------------


def _put(s3, bucket: str, key: str, path: Path) -> None:
    s3.client().upload_file(str(path), bucket, key, ExtraArgs={"ACL": "public-read"})


@pytest.fixture
def own_bucket(s3, nsd_tree, tmp_path):
    """A bucket of the session's tree that a test may change, and the local copy it was uploaded from."""
    import shutil

    name = f"changing-{tmp_path.name.lower().replace('_', '-')}"[:63]
    root = tmp_path / "tree"
    shutil.copytree(nsd_tree.root, root)
    s3.upload_tree(root, name)
    return name, root


def test_a_rerun_after_the_buckets_pictures_changed_reads_the_new_ones(own_bucket, s3, nsd_tree, tmp_path):
    """Same key, same size, new pictures: the cached pictures are not the bucket's any more."""
    import h5py

    from brainldm.data.trials import load_trials

    name, root = own_bucket
    prepare_subject(
        f"s3://{name}",
        1,
        tmp_path / "old",
        sessions=1,
        progress=False,
        coco_annotations=nsd_tree.coco_archive,
        cache_dir=tmp_path / "cache",
    )
    with h5py.File(nsd.stimuli_path(root), "r+") as f:
        f["imgBrick"][...] = 255 - f["imgBrick"][...]  # in place: the file keeps its size
    size = nsd.stimuli_path(root).stat().st_size
    _put(s3, name, nsd.STIMULI, nsd.stimuli_path(root))
    assert s3.client().head_object(Bucket=name, Key=nsd.STIMULI)["ContentLength"] == size
    from brainldm.data.storage import Storage

    storage = Storage(f"s3://{name}", cache_dir=tmp_path / "cache")
    prepare_subject(storage, 1, tmp_path / "new", sessions=1, progress=False, coco_annotations=nsd_tree.coco_archive)
    local = prepare_subject(
        root, 1, tmp_path / "local", sessions=1, progress=False, coco_annotations=nsd_tree.coco_archive
    )
    new, fresh = load_trials(tmp_path / "new", 1, "test"), load_trials(local.parent, 1, "test")
    for a, b in zip(new, fresh):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    old = load_trials(tmp_path / "old", 1, "test")
    assert not np.array_equal(np.asarray(old[0]["image"]), np.asarray(new[0]["image"]))
    assert any("nsd_stimuli.hdf5 is not what its cached pictures came from" in n for n in storage.notes)


def test_damaged_cache_entries_are_fetched_again(own_bucket, s3, nsd_tree, tmp_path):
    name, root = own_bucket
    cache = tmp_path / "cache"
    args = dict(sessions=1, progress=False, coco_annotations=nsd_tree.coco_archive, cache_dir=cache)
    prepare_subject(f"s3://{name}", 1, tmp_path / "a", **args)
    info = next(cache.rglob("nsd_stim_info_merged.csv"))
    info.write_bytes(info.read_bytes()[:100])  # cut short
    pictures = sorted(cache.rglob("nsd_stimuli.hdf5.images/*.npy"))
    pictures[0].write_bytes(pictures[0].read_bytes()[:1000])
    s3.requests.clear()
    prepare_subject(f"s3://{name}", 1, tmp_path / "b", **args)
    assert s3.fetched("nsd_stim_info_merged.csv") == nsd.stim_info_path(root).stat().st_size  # whole, once
    picture, metadata = 128 * 128 * 3, 512 * 1024
    assert picture <= s3.fetched("nsd_stimuli.hdf5") < picture + metadata  # that one picture, not the others
    for small in ("nsd_expdesign.mat", "roi/"):
        assert s3.fetched(small) == 0, small


def test_a_session_changed_between_two_runs_of_one_prepare_is_named(own_bucket, s3, nsd_tree, tmp_path, monkeypatch):
    name, root = own_bucket
    real_read = _killed_at_session_2(monkeypatch)
    args = dict(progress=False, cache_dir=tmp_path / "cache", coco_annotations=nsd_tree.coco_archive)
    with pytest.raises(KeyboardInterrupt):
        prepare_subject(f"s3://{name}", 1, tmp_path / "out", **args)
    monkeypatch.setattr(nsd, "read_betas", real_read)
    key = nsd.betas_file(1, 1, ".hdf5")
    _put(s3, name, key, root / nsd.betas_file(1, 2, ".hdf5"))  # session 1 replaced by another file
    with pytest.raises(InputError, match=r"betas_session01\.hdf5 changed since this prepare started"):
        prepare_subject(f"s3://{name}", 1, tmp_path / "out", **args)
    assert not (tmp_path / "out" / ".subj01.partial").exists()  # nothing of the old file is kept to mix
    prepare_subject(f"s3://{name}", 1, tmp_path / "out", **args)  # and a new run prepares from the new file
    assert (tmp_path / "out" / "subj01" / "info.json").exists()


@pytest.mark.parametrize(
    "root, match",
    [
        ("s3://", "'s3://' names no bucket or folder after s3://"),
        ("nosuch://bucket", "fsspec knows no protocol 'nosuch'"),
        ("gs://bucket", "gs:// needs the package gcsfs.*pip install gcsfs"),
    ],
)
def test_a_vague_url_says_what_is_wrong_with_it(root, match, tmp_path):
    with pytest.raises(InputError, match=match):
        prepare_subject(root, 1, tmp_path / "out", progress=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


# --- any layout of the stimuli file -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        dict(chunks=(4, 128, 128, 3), compression="gzip", shuffle=True),  # four pictures a chunk, gzip
        dict(chunks=(3, 50, 64, 3), compression="gzip"),  # parts of pictures, partial chunks at every edge
        dict(chunks=(2, 128, 128, 3), fletcher32=True),  # unfiltered but checksummed
    ],
    ids=["4-a-chunk-gzip-shuffle", "tiles-with-edges", "fletcher32"],
)
def test_a_stimuli_file_of_any_layout_is_read_from_the_bucket_fetching_only_the_needed_chunks(
    nsd_tree, s3, tmp_path, layout
):
    import h5py

    from brainldm.data.storage import Storage

    name = f"stimuli-{layout['chunks'][0]}-{len(layout)}"
    path = tmp_path / nsd.STIMULI
    path.parent.mkdir(parents=True)
    with h5py.File(nsd.stimuli_path(nsd_tree.root), "r") as src, h5py.File(path, "w") as dst:
        pictures = src["imgBrick"][:]
        dst.create_dataset("imgBrick", data=pictures, **layout)
    s3.upload_tree(tmp_path, name)
    ids = np.unique(nsd_tree.trial_images[1])
    storage = Storage(f"s3://{name}", cache_dir=tmp_path / "cache")
    with nsd.Stimuli(storage, ids) as remote:
        for i in ids:
            np.testing.assert_array_equal(remote[i], pictures[i])
    assert any("not one picture a chunk" in n and "MiB" in n for n in storage.notes)
    per_chunk = layout["chunks"][0]
    stored: dict[int, int] = {}  # stored bytes of each row of chunks
    with h5py.File(path, "r") as f:
        for k in range(f["imgBrick"].id.get_num_chunks()):
            info = f["imgBrick"].id.get_chunk_info(k)
            stored[info.chunk_offset[0] // per_chunk] = stored.get(info.chunk_offset[0] // per_chunk, 0) + info.size
    needed = sum(stored[r] for r in {int(i) // per_chunk for i in ids})
    assert needed < sum(stored.values())  # the other subject's pictures lie in chunks of their own
    assert needed <= s3.fetched(nsd.STIMULI) < needed + 512 * 1024  # those chunks, the header and index, no more


def test_a_session_the_bucket_lists_but_refuses_is_named_with_the_way_round_it(own_bucket, s3, nsd_tree, tmp_path):
    name, _ = own_bucket
    key = nsd.betas_file(1, 3, ".hdf5")
    s3.client().put_object_acl(Bucket=name, Key=key, ACL="private")  # listed, not readable: as NSD's withheld ones
    with pytest.raises(InputError, match=r"session 3 of subject 1 is listed in .* refused .*pass --sessions 2 ") as err:
        prepare_subject(f"s3://{name}", 1, tmp_path / "out", progress=False, cache_dir=tmp_path / "cache",
                        coco_annotations=nsd_tree.coco_archive)  # fmt: skip
    assert "credentials" not in str(err.value) and not (tmp_path / "out").exists()
    prepare_subject(f"s3://{name}", 1, tmp_path / "out", sessions=2, progress=False, cache_dir=tmp_path / "cache",
                    coco_annotations=nsd_tree.coco_archive)  # fmt: skip
