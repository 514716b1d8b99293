"""Where an HDF5 dataset's chunks lie in its file, found by reading only the index nodes on the way to them.

NSD stores each session's betas as one uncompressed chunk per voxel (its 750 trials) and its pictures one after the
other, so a subject's voxels or pictures are a set of byte ranges of the file. Here the chunk index is walked level
by level, fetching all the nodes a level needs at once (concurrent requests) and only the nodes that lead to wanted
chunks: on a full-size synthetic session (1.10 GB, 699,192 chunks, a 16,188-voxel ROI, over S3) that is 20 MiB of
index in 5,822 requests. The maintained readers read the whole index or more there: pyfive 1.3.0 61 MiB in 28,916
requests, h5py's ``chunk_iter`` 0.9-2.2 GB, kerchunk 0.2.10 9 GB, VirtualiZarr 2.5.1 3.2 GB. h5py's one-chunk lookup
(``get_chunk_info_by_coord``) is no way out: in HDF5 2.0 it scans the index linearly (measured on a local file:
0.004 ms for the first chunk, 119 ms for the last), hundreds of MB per lookup over the network.

The index walked is HDF5's version-1 B-tree (file format spec, "Version 1 B-trees"), which indexes the chunks of
every file MATLAB writes and of h5py's files up to ``libver="v108"``, with either object-header version (1, or 2 as
superblocks 2 and 3 have), with or without a user block (MATLAB's ``-v7.3`` files start with 512 bytes; every
address in the file is relative to the end of it), and with the node size K the file states. Other indexes (layout
message version 4, from ``libver="latest"``) are read whole, once, by h5py's own walk over them: correct, with far
more bytes, and said on the progress line with its cost.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import h5py
import numpy as np

from brainldm.data.storage import Storage
from brainldm.validation import InputError

LAYOUT_MESSAGE, CONTINUATION_MESSAGE, BTREE_K_MESSAGE = 0x0008, 0x0010, 0x0013
UNDEFINED = 2**64 - 1
DEFAULT_K = 32  # HDF5's default "indexed storage internal node K": nodes hold up to 2K children
SIGNATURE = b"\x89HDF\r\n\x1a\n"
# bytes h5py's walk over a whole chunk index fetched per chunk (865 MiB for 699,192 chunks, over S3 in 64 kB blocks)
FALLBACK_BYTES_PER_CHUNK = 1300


def chunk_ranges(
    storage: Storage, rel: str, dataset: h5py.Dataset, coords: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """File offsets, stored sizes and filter masks of the chunks at chunk-grid coordinates ``coords`` (n, rank);
    offset -1 for a chunk never written (it reads as the fill value).

    A contiguous dataset counts as chunked along its first axis, one chunk per index. A filtered (compressed)
    dataset's chunks are its stored bytes: :class:`ChunkDecoder` turns them into values.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(len(coords), dataset.ndim)
    plist = dataset.id.get_create_plist()
    no_masks = np.zeros(len(coords), dtype=np.int64)
    if plist.get_layout() == h5py.h5d.CONTIGUOUS:
        base = dataset.id.get_offset()
        row = int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize
        sizes = np.full(len(coords), row, dtype=np.int64)
        if base is None:  # nothing written yet
            return np.full(len(coords), -1, dtype=np.int64), sizes, no_masks
        return base + coords[:, 0] * row, sizes, no_masks
    if plist.get_layout() != h5py.h5d.CHUNKED:
        raise InputError(f"{storage.url(rel)}: {dataset.name} has a layout that cannot be read in parts")
    grid = tuple(-(-n // c) for n, c in zip(dataset.shape, dataset.chunks))
    index = btree_index(storage, rel, dataset)
    if isinstance(index, str):
        n_chunks = int(np.prod(grid))
        storage.note(
            f"{storage.url(rel)}: {dataset.name}'s chunks are indexed by {index}, which brainldm does not walk; "
            f"reading the whole index instead ({n_chunks:,} chunks, about "
            f"{n_chunks * FALLBACK_BYTES_PER_CHUNK / 2**20:,.0f} MiB over the network)"
        )
        return _lookup_all(dataset, coords, grid)
    if index.root == UNDEFINED:
        return np.full(len(coords), -1, dtype=np.int64), np.zeros(len(coords), dtype=np.int64), no_masks
    return _walk(storage, rel, index, dataset.chunks, grid, coords)


def _lookup_all(
    dataset: h5py.Dataset, coords: np.ndarray, grid: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """h5py's own walk over the whole chunk index, in file order: for indexes other than the version-1 B-tree."""
    offsets = np.full(int(np.prod(grid)), -1, dtype=np.int64)
    sizes = np.zeros(len(offsets), dtype=np.int64)
    masks = np.zeros(len(offsets), dtype=np.int64)
    chunks = np.asarray(dataset.chunks)

    def visit(info) -> None:
        k = np.ravel_multi_index(tuple(np.asarray(info.chunk_offset) // chunks), grid)
        offsets[k], sizes[k], masks[k] = info.byte_offset, info.size, info.filter_mask

    dataset.id.chunk_iter(visit)
    wanted = np.ravel_multi_index(tuple(coords.T), grid)
    return offsets[wanted], sizes[wanted], masks[wanted]


@dataclass(frozen=True)
class BTreeIndex:
    """A dataset's version-1 B-tree chunk index: its root's address (relative to ``base``), the file's base address
    (the user block's size: every address in the file counts from it) and K (nodes hold up to 2K children)."""

    root: int
    base: int
    k: int


def btree_index(storage: Storage, rel: str, dataset: h5py.Dataset) -> BTreeIndex | str:
    """The dataset's version-1 B-tree index, from its object header's layout message (object header version 1 or
    2); or, for any other index, a few words saying what it is."""
    create = dataset.file.id.get_create_plist()
    if create.get_sizes() != (8, 8):
        return f"{create.get_sizes()[0] * 8}-bit addresses"
    base = create.get_userblock()
    # the object header's address, from the link to it (h5o.get_info would walk the whole chunk index for its sizes)
    parent = dataset.parent  # kept: its links proxy does not keep the group open
    address = parent.id.links.get_info(dataset.name.rsplit("/", 1)[-1].encode()).u
    for kind, body in _header_messages(storage, rel, base, address):
        if kind == LAYOUT_MESSAGE:
            if body[0] != 3 or body[1] != 2:
                return f"a version-{body[0]} layout message (a newer chunk index)"
            root = struct.unpack("<Q", body[3:11])[0]
            return BTreeIndex(root=root, base=base, k=_istore_k(storage, rel, base))
    return "an object header without a layout message"


def _header_messages(storage: Storage, rel: str, base: int, address: int):
    """(type, body) of every message of the object header at ``address``, version 1 or 2 ("OHDR"), following
    continuation blocks."""
    (prefix,) = storage.read_ranges(rel, [base + address], [32])
    if prefix[:4] == b"OHDR":
        version, flags = prefix[4], prefix[5]
        at = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 0x03)
        size = int.from_bytes(prefix[at : at + width], "little")
        blocks = [(base + address + at + width, size)]
        header = 4 + (2 if flags & 0x04 else 0)  # type, size, flags (and creation order)
    elif prefix[0] == 1:
        version, flags, header = 1, 0, 8  # type (2), size (2), flags, 3 reserved
        blocks = [(base + address + 16, struct.unpack("<I", prefix[8:12])[0])]
    else:
        return
    while blocks:
        start, length = blocks.pop()
        (block,) = storage.read_ranges(rel, [start], [length])
        at = 4 if block[:4] == b"OCHK" else 0
        end = len(block) - (4 if version == 2 and at else 0)  # a continuation block ends with its checksum
        while at + header <= end:
            if version == 2:
                kind, size = block[at], struct.unpack("<H", block[at + 1 : at + 3])[0]
            else:
                kind, size = struct.unpack("<HH", block[at : at + 4])
            body = block[at + header : at + header + size]
            if kind == CONTINUATION_MESSAGE:
                offset, length = struct.unpack("<QQ", body[:16])
                blocks.append((base + offset, length))
            else:
                yield kind, body
            at += header + size


def _istore_k(storage: Storage, rel: str, base: int) -> int:
    """The file's "indexed storage internal node K": in superblock version 1, or in the superblock extension's
    B-tree 'K' values message (versions 2 and 3); HDF5's default where the file does not state it (version 0)."""
    (block,) = storage.read_ranges(rel, [base], [48])
    if block[:8] != SIGNATURE:
        return DEFAULT_K
    version = block[8]
    if version == 1:
        return struct.unpack("<H", block[24:26])[0]
    if version in (2, 3):
        extension = struct.unpack("<Q", block[20:28])[0]
        if extension != UNDEFINED:
            for kind, body in _header_messages(storage, rel, base, extension):
                if kind == BTREE_K_MESSAGE:
                    return struct.unpack("<H", body[1:3])[0]
    return DEFAULT_K


def _walk(
    storage: Storage,
    rel: str,
    index: BTreeIndex,
    chunk_shape: tuple[int, ...],
    grid: tuple[int, ...],
    coords: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Walk the B-tree from its root down to the leaves that hold the wanted chunks, one level per round. Chunk
    offsets are returned as positions in the file (the base address added), as h5py reports them."""
    rank = len(chunk_shape)
    # a key: chunk size (u32), filter mask (u32), the chunk's offset in elements along each axis plus one more (u64)
    entry = np.dtype([("size", "<u4"), ("mask", "<u4"), ("offset", "<u8", (rank + 1,)), ("child", "<u8")])
    key_size = entry.itemsize - 8
    wanted = np.ravel_multi_index(tuple(coords.T), grid)
    order = np.argsort(wanted, kind="stable")
    offsets = np.full(len(coords), -1, dtype=np.int64)
    sizes = np.zeros(len(coords), dtype=np.int64)
    masks = np.zeros(len(coords), dtype=np.int64)
    n_children = 2 * index.k
    frontier = {index.root: order}  # node address -> positions in ``coords`` of the chunks under it
    while frontier:
        addresses = sorted(frontier)
        node_size = 24 + n_children * entry.itemsize + key_size
        nodes = storage.read_ranges(rel, [index.base + a for a in addresses], [node_size] * len(addresses), max_gap=0)
        following: dict[int, list[np.ndarray]] = {}
        for address, node in zip(addresses, nodes):
            if node[:4] != b"TREE" or node[4] != 1:
                raise InputError(f"{storage.url(rel)}: no chunk index node at byte {address}; the file is damaged")
            level, used = node[5], struct.unpack("<H", node[6:8])[0]
            if used > n_children:
                raise InputError(f"{storage.url(rel)}: a chunk index node at byte {address} holds more entries than K")
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
                offsets[here[found]] = index.base + entries["child"][at[found]].astype(np.int64)
                sizes[here[found]] = entries["size"][at[found]]
                masks[here[found]] = entries["mask"][at[found]]
        frontier = {a: np.concatenate(p) for a, p in following.items()}
    return offsets, sizes, masks


class ChunkDecoder:
    """A dataset's stored chunk bytes -> the chunk's values, through HDF5's own filter pipeline (gzip, shuffle,
    Fletcher-32, scale-offset, or any filter h5py has): each chunk is written as-is into a one-chunk dataset of an
    in-memory file that has the dataset's type and creation properties, and read back."""

    def __init__(self, dataset: h5py.Dataset):
        self.shape, self.dtype = dataset.chunks, dataset.dtype
        self._file = h5py.File(io.BytesIO(), "w")
        space = h5py.h5s.create_simple(self.shape)
        self._chunk = h5py.h5d.create(
            self._file.id, b"chunk", dataset.id.get_type(), space, dcpl=dataset.id.get_create_plist()
        )

    def __call__(self, stored: bytes, filter_mask: int = 0) -> np.ndarray:
        self._chunk.write_direct_chunk((0,) * len(self.shape), stored, int(filter_mask))
        values = np.empty(self.shape, dtype=self.dtype)
        self._chunk.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
        return values

    def close(self) -> None:
        self._file.close()
