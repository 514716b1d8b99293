"""Where an HDF5 dataset's chunks lie: the chunk index walked level by level gives h5py's own answer, for every
index layout, and reading those byte ranges gives the values."""

import h5py
import numpy as np
import pytest

from brainldm.data.h5chunks import BTreeIndex, btree_index, chunk_ranges
from brainldm.data.storage import Storage


def _write(path, libver="earliest", written=None, userblock=0, **kwargs):
    data = np.random.default_rng(0).integers(-3000, 3000, (50, 9, 11, 40), dtype=np.int16)  # T x Z x Y x X
    with h5py.File(path, "w", libver=libver, **({"userblock_size": userblock} if userblock else {})) as f:
        if written is None:
            f.create_dataset("betas", data=data, **kwargs)
        else:  # only some chunks, in a shuffled order: the file order is not the grid order
            dataset = f.create_dataset("betas", shape=data.shape, dtype=data.dtype, **kwargs)
            for z, y, x in written:
                dataset[:, z, y, x] = data[:, z, y, x]
    return data


def _coords(n, rng=np.random.default_rng(1)):
    return np.stack([np.zeros(n, int), rng.integers(0, 9, n), rng.integers(0, 11, n), rng.integers(0, 40, n)], 1)


# MATLAB's and h5py's default (superblock 0, object header 1), h5py's libver="v108" (superblock 2, object header 2,
# still a version-1 B-tree), each with and without a 512-byte user block (MATLAB's -v7.3 files have one), and
# libver="latest" (a newer index: the fallback). h5py cannot set the node size K, so the files here have K = 32.
LAYOUTS = [("earliest", 0), ("earliest", 512), ("v108", 0), ("v108", 512), ("latest", 0), ("latest", 512)]


@pytest.mark.parametrize("libver, userblock", LAYOUTS)
def test_chunk_offsets_are_the_ones_h5py_reports(tmp_path, libver, userblock):
    data = _write(tmp_path / "b.hdf5", libver, userblock=userblock, chunks=(50, 1, 1, 1))  # 3,960 chunks, 3 levels
    roi = np.argwhere(np.ones((2, 11, 40)))[::2] + [3, 0, 0]  # a compact ROI, as NSD's: every other voxel of 2 slices
    coords = np.concatenate([np.zeros((len(roi), 1), int), roi], axis=1)
    storage = Storage(tmp_path)
    with storage.open_hdf5("b.hdf5") as f:
        index = btree_index(storage, "b.hdf5", f["betas"])
        assert isinstance(index, BTreeIndex) == (libver != "latest")  # the walk, or h5py's
        if libver != "latest":
            assert (index.base, index.k) == (userblock, 32)
        storage.bytes_fetched = 0
        offsets, sizes, _ = chunk_ranges(storage, "b.hdf5", f["betas"], coords)
        index_bytes = storage.bytes_fetched
        expected = [f["betas"].id.get_chunk_info_by_coord(tuple(c)).byte_offset for c in coords]
    np.testing.assert_array_equal(offsets, expected)
    assert (sizes == 50 * 2).all()
    if libver != "latest":  # the leaves holding the ROI's 22% of the chunks, the nodes above them, the headers
        node = 24 + 64 * 56 + 48  # 2K entries of 56 bytes (a key of rank 4 and a child address) and a last key
        whole_index = 3960 / 64 * node
        assert index_bytes < 1.5 * (880 / 3960) * whole_index + 2 * node + 4096 < 0.5 * whole_index
    assert storage.notes == ([] if libver != "latest" else storage.notes[:1])
    assert (libver == "latest") == any("reading the whole index instead" in n for n in storage.notes)
    blocks = storage.read_ranges("b.hdf5", offsets, sizes)
    values = np.frombuffer(b"".join(blocks), dtype=np.int16).reshape(len(coords), 50)
    np.testing.assert_array_equal(values, data[:, coords[:, 1], coords[:, 2], coords[:, 3]].T)


def test_the_fallback_says_so_on_the_progress_line_with_its_cost(tmp_path, capsys):
    _write(tmp_path / "b.hdf5", "latest", chunks=(50, 1, 1, 1))
    storage = Storage(tmp_path, progress=True)
    with storage.open_hdf5("b.hdf5") as f:
        chunk_ranges(storage, "b.hdf5", f["betas"], _coords(5))
    (note,) = storage.notes
    assert "version-4 layout message" in note and "3,960 chunks" in note and "MiB" in note
    assert note in capsys.readouterr().out + capsys.readouterr().err


def test_chunks_written_out_of_order_and_missing_ones(tmp_path):
    rng = np.random.default_rng(2)
    everything = [tuple(c) for c in np.argwhere(np.ones((9, 11, 40)))]
    written = [everything[i] for i in rng.permutation(len(everything))[:2000]]
    data = _write(tmp_path / "b.hdf5", written=written, chunks=(50, 1, 1, 1))
    coords = _coords(300)
    storage = Storage(tmp_path)
    with storage.open_hdf5("b.hdf5") as f:
        offsets, _, _ = chunk_ranges(storage, "b.hdf5", f["betas"], coords)
        for coord, offset in zip(coords, offsets):
            info = f["betas"].id.get_chunk_info_by_coord(tuple(coord))
            assert offset == (-1 if info.byte_offset is None else info.byte_offset)
    assert (offsets == -1).any() and (offsets >= 0).any()
    stored = set(written)
    assert all((offset >= 0) == (tuple(c[1:]) in stored) for c, offset in zip(coords, offsets))
    present = offsets >= 0
    blocks = storage.read_ranges("b.hdf5", offsets[present], np.full(present.sum(), 100))
    values = np.frombuffer(b"".join(blocks), dtype=np.int16).reshape(-1, 50)
    c = coords[present]
    np.testing.assert_array_equal(values, data[:, c[:, 1], c[:, 2], c[:, 3]].T)


def test_a_contiguous_dataset_counts_as_one_chunk_per_row(tmp_path):
    with h5py.File(tmp_path / "s.hdf5", "w") as f:
        f.create_dataset("imgBrick", data=np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3))
    storage = Storage(tmp_path)
    with storage.open_hdf5("s.hdf5") as f:
        offsets, sizes, _ = chunk_ranges(storage, "s.hdf5", f["imgBrick"], np.array([[3, 0, 0, 0], [1, 0, 0, 0]]))
        expected = f["imgBrick"][[1, 3]]
    blocks = storage.read_ranges("s.hdf5", offsets, sizes)
    np.testing.assert_array_equal(np.frombuffer(blocks[0], np.uint8).reshape(4, 4, 3), expected[1])
    np.testing.assert_array_equal(np.frombuffer(blocks[1], np.uint8).reshape(4, 4, 3), expected[0])
