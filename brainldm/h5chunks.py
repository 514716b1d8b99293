"""Where an HDF5 dataset's chunks lie in its file, found by reading only the index nodes on the way to them.

NSD stores each session's betas as one uncompressed chunk per voxel (its 750 trials) and its pictures one after the
other, so a subject's voxels or pictures are a set of byte ranges of the file. h5py can say where one chunk lies
(``get_chunk_info_by_coord``), but each call walks the chunk index from its root, one small read at a time: over the
network that is thousands of round trips per session. Here the index is walked level by level instead, fetching all
the nodes a level needs at once (concurrent requests) and only the nodes that lead to wanted chunks.

The chunk index read here is HDF5's version-1 B-tree (file format spec, "Version 1 B-trees"), the index of every file
written with HDF5's default, oldest-compatible format, as MATLAB and h5py write them. Other indexes (files written
with ``libver="latest"``) are read whole, once, by h5py's own walk over them: correct, with more bytes.
"""

from __future__ import annotations

import struct

import h5py
import numpy as np

from .storage import Storage
from .validation import InputError

LAYOUT_MESSAGE, CONTINUATION_MESSAGE = 0x0008, 0x0010
UNDEFINED = 2**64 - 1
DEFAULT_K = 32  # HDF5's default "indexed storage internal node K": nodes hold up to 2K children


def chunk_ranges(
    storage: Storage, rel: str, dataset: h5py.Dataset, coords: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """File offsets and sizes of the chunks at chunk-grid coordinates ``coords`` (n, rank); offset -1 for a chunk
    never written (it reads as the fill value).

    A contiguous dataset counts as chunked along its first axis, one chunk per index. Compressed (filtered)
    datasets are refused: their bytes are not the values.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(len(coords), dataset.ndim)
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters():
        raise InputError(f"{storage.url(rel)}: {dataset.name} is compressed; only uncompressed datasets are read")
    if plist.get_layout() == h5py.h5d.CONTIGUOUS:
        base = dataset.id.get_offset()
        row = int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize
        sizes = np.full(len(coords), row, dtype=np.int64)
        if base is None:  # nothing written yet
            return np.full(len(coords), -1, dtype=np.int64), sizes
        return base + coords[:, 0] * row, sizes
    if plist.get_layout() != h5py.h5d.CHUNKED:
        raise InputError(f"{storage.url(rel)}: {dataset.name} has a layout that cannot be read in parts")
    grid = tuple(-(-n // c) for n, c in zip(dataset.shape, dataset.chunks))
    root = _btree_root(storage, rel, dataset)
    if root is None:
        return _lookup_all(dataset, coords, grid)
    if root == UNDEFINED:
        return np.full(len(coords), -1, dtype=np.int64), np.zeros(len(coords), dtype=np.int64)
    return _walk(storage, rel, root, dataset.chunks, grid, coords)


def _lookup_all(dataset: h5py.Dataset, coords: np.ndarray, grid: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """h5py's own walk over the whole chunk index, in file order: for indexes other than the version-1 B-tree."""
    offsets = np.full(int(np.prod(grid)), -1, dtype=np.int64)
    sizes = np.zeros(len(offsets), dtype=np.int64)
    chunks = np.asarray(dataset.chunks)

    def visit(info) -> None:
        k = np.ravel_multi_index(tuple(np.asarray(info.chunk_offset) // chunks), grid)
        offsets[k], sizes[k] = info.byte_offset, info.size

    dataset.id.chunk_iter(visit)
    wanted = np.ravel_multi_index(tuple(coords.T), grid)
    return offsets[wanted], sizes[wanted]


def _btree_root(storage: Storage, rel: str, dataset: h5py.Dataset) -> int | None:
    """The address of the dataset's version-1 B-tree, from the layout message of its version-1 object header;
    None for any other header, layout version or address size."""
    if dataset.file.id.get_create_plist().get_sizes() != (8, 8):
        return None
    # the object header's address, from the link to it (h5o.get_info would walk the whole chunk index for its sizes)
    parent = dataset.parent  # kept: its links proxy does not keep the group open
    address = parent.id.links.get_info(dataset.name.rsplit("/", 1)[-1].encode()).u
    (prefix,) = storage.read_ranges(rel, [address], [16])
    version, _, n_messages, _, size = struct.unpack("<BBHII", prefix[:12])
    if version != 1:
        return None
    blocks = [(address + 16, size)]
    while blocks:
        start, length = blocks.pop()
        (block,) = storage.read_ranges(rel, [start], [length])
        at = 0
        while at + 8 <= len(block):
            kind, msg_size = struct.unpack("<HH", block[at : at + 4])
            body = block[at + 8 : at + 8 + msg_size]
            if kind == LAYOUT_MESSAGE:
                if body[0] != 3 or body[1] != 2:  # layout message version 3, chunked class
                    return None
                return struct.unpack("<Q", body[3:11])[0]
            if kind == CONTINUATION_MESSAGE:
                blocks.append(struct.unpack("<QQ", body[:16]))
            at += 8 + msg_size
    return None


def _walk(
    storage: Storage,
    rel: str,
    root: int,
    chunk_shape: tuple[int, ...],
    grid: tuple[int, ...],
    coords: np.ndarray,
    n_children: int = 2 * DEFAULT_K,
) -> tuple[np.ndarray, np.ndarray]:
    """Walk the B-tree from ``root`` down to the leaves that hold the wanted chunks, one level per round."""
    rank = len(chunk_shape)
    # a key: chunk size (u32), filter mask (u32), the chunk's offset in elements along each axis plus one more (u64)
    entry = np.dtype([("size", "<u4"), ("mask", "<u4"), ("offset", "<u8", (rank + 1,)), ("child", "<u8")])
    key_size = entry.itemsize - 8
    wanted = np.ravel_multi_index(tuple(coords.T), grid)
    order = np.argsort(wanted, kind="stable")
    offsets = np.full(len(coords), -1, dtype=np.int64)
    sizes = np.zeros(len(coords), dtype=np.int64)
    frontier = {root: order}  # node address -> positions in ``coords`` of the chunks under it
    while frontier:
        addresses = sorted(frontier)
        node_size = 24 + n_children * entry.itemsize + key_size
        nodes = storage.read_ranges(rel, addresses, [node_size] * len(addresses), max_gap=0)
        following: dict[int, list[np.ndarray]] = {}
        for address, node in zip(addresses, nodes):
            if node[:4] != b"TREE" or node[4] != 1:
                raise InputError(f"{storage.url(rel)}: no chunk index node at byte {address}; the file is damaged")
            level, used = node[5], struct.unpack("<H", node[6:8])[0]
            if used > n_children:  # a file written with a larger K: start again, reading nodes of that size
                return _walk(storage, rel, root, chunk_shape, grid, coords, used)
            entries = np.frombuffer(node, dtype=entry, count=used, offset=24)
            first = np.ravel_multi_index(tuple((entries["offset"][:, :rank] // chunk_shape).T.astype(np.int64)), grid)
            here = frontier[address]
            if level > 0:
                child = np.clip(np.searchsorted(first, wanted[here], side="right") - 1, 0, used - 1)
                for c in np.unique(child):
                    following.setdefault(int(entries["child"][c]), []).append(here[child == c])
            else:
                at = np.minimum(np.searchsorted(first, wanted[here]), used - 1)
                found = first[at] == wanted[here]
                offsets[here[found]] = entries["child"][at[found]].astype(np.int64)
                sizes[here[found]] = entries["size"][at[found]]
        frontier = {a: np.concatenate(p) for a, p in following.items()}
    return offsets, sizes
