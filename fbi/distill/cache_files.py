"""The cache's per-shard files, read and written row by row through a bounded set of open
files, and the checksum that binds each row to its sample.

Per token shard: ``<stem>.ids`` and ``<stem>.vals`` (and ``<stem>.tail`` for top-k in a
float format) hold (samples, seq_len, slots) rows; ``<stem>.crc`` holds one uint32 per row,
the CRC-32 of the sample id and the row's bytes in every file (``row_checksum``). A row whose
ids and values come from different writes, a row left unwritten (zeros, checksum 0) or a
row damaged on disk fails it.

Rows move with ``pread``/``pwrite``: no memory maps, and at most ``max_open`` file
descriptors, the least recently used closed first (Amber's 25,200 shards are 75,600 files
or more, beyond a process's usual 1,024 to 65,536 descriptors and ``vm.max_map_count``).
``flush`` syncs only the files written since the last flush, in parallel.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAX_OPEN = 256  # file descriptors one CacheFiles keeps open
SYNC_THREADS = 16
CRC = np.dtype("<u4")


def has_tail_file(manifest: dict) -> bool:
    """Top-k in a float format stores the tail; uint8 units imply it, sampled has none."""
    return manifest["mode"] == "topk" and manifest["value_dtype"] != "uint8"


def kinds(manifest: dict) -> tuple[str, ...]:
    data = ("ids", "vals", "tail") if has_tail_file(manifest) else ("ids", "vals")
    return data + ("crc",)


def file_names(manifest: dict) -> list[str]:
    return [f"{Path(s['file']).stem}.{k}" for s in manifest["token_shards"]
            for k in kinds(manifest)]


def vals_dtype(manifest: dict) -> np.dtype:
    if manifest["mode"] == "sampled":
        return np.dtype(manifest["count_dtype"])
    # numpy has no bfloat16: its bits are stored as uint16 and reinterpreted by torch.
    return np.dtype("uint16" if manifest["value_dtype"] == "bfloat16" else manifest["value_dtype"])


def row_checksum(sample_id: int, ids: np.ndarray, vals: np.ndarray,
                 tail: np.ndarray | None) -> int:
    """CRC-32 of the sample id and the row's bytes, never 0 (0 marks a row never written)."""
    crc = zlib.crc32(int(sample_id).to_bytes(8, "little"))
    for a in (ids, vals) if tail is None else (ids, vals, tail):
        crc = zlib.crc32(np.ascontiguousarray(a), crc)
    return crc or 1


class Row(NamedTuple):
    """One sample's stored targets: ids and vals (seq_len, slots), tail (seq_len) or None,
    and the checksum recorded with them."""

    ids: np.ndarray
    vals: np.ndarray
    tail: np.ndarray | None
    crc: int


class CacheFiles:
    """Row access to a cache's files with at most ``max_open`` descriptors open."""

    def __init__(self, directory: Path, manifest: dict, writable: bool = False,
                 max_open: int = MAX_OPEN) -> None:
        if max_open < len(kinds(manifest)):
            raise ValueError(f"max_open: {max_open} is below the {len(kinds(manifest))} files "
                             "of one shard")
        seq, slots = manifest["seq_len"], manifest["slots"]
        self.directory, self.max_open = directory, max_open
        self.stems = [Path(s["file"]).stem for s in manifest["token_shards"]]
        self.dtypes = {"ids": np.dtype(manifest["id_dtype"]), "vals": vals_dtype(manifest),
                       "tail": vals_dtype(manifest), "crc": CRC}
        self.shapes = {"ids": (seq, slots), "vals": (seq, slots), "tail": (seq,), "crc": ()}
        self.row_bytes = {k: self.dtypes[k].itemsize * int(np.prod(self.shapes[k]))
                          for k in self.dtypes}
        self.tail = has_tail_file(manifest)
        self._flags = os.O_RDWR if writable else os.O_RDONLY
        self._open: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._dirty: set[tuple[int, str]] = set()
        self.peak_open = 0

    @staticmethod
    def create(directory: Path, manifest: dict) -> None:
        """Files of their final size, holes until written (so any rank may fill any row)."""
        files = CacheFiles(directory, manifest)
        for s in manifest["token_shards"]:
            stem, rows = Path(s["file"]).stem, max(1, s["samples"])
            for kind in kinds(manifest):
                with open(directory / f"{stem}.{kind}", "ab") as f:
                    f.truncate(rows * files.row_bytes[kind])

    def _fd(self, shard: int, kind: str) -> int:
        key = (shard, kind)
        fd = self._open.get(key)
        if fd is not None:
            self._open.move_to_end(key)
            return fd
        while len(self._open) >= self.max_open:
            old, old_fd = self._open.popitem(last=False)
            if old in self._dirty:  # its rows must be on disk before a log says so
                os.fdatasync(old_fd)
                self._dirty.discard(old)
            os.close(old_fd)
        fd = os.open(self.directory / f"{self.stems[shard]}.{kind}", self._flags)
        self._open[key] = fd
        self.peak_open = max(self.peak_open, len(self._open))
        return fd

    def _read(self, shard: int, kind: str, row: int) -> np.ndarray:
        n = self.row_bytes[kind]
        data = os.pread(self._fd(shard, kind), n, row * n)
        if len(data) != n:
            raise ValueError(f"{self.directory / self.stems[shard]}.{kind}: row {row} is past "
                             "the end of the file; the cache is damaged: delete it and write "
                             "it again")
        return np.frombuffer(data, self.dtypes[kind]).reshape(self.shapes[kind])

    def read(self, shard: int, row: int) -> Row:
        return Row(self._read(shard, "ids", row), self._read(shard, "vals", row),
                   self._read(shard, "tail", row) if self.tail else None,
                   int(self._read(shard, "crc", row)))

    def write(self, shard: int, row: int, sample_id: int, ids: np.ndarray, vals: np.ndarray,
              tail: np.ndarray | None) -> None:
        """Write one sample's row and, last, its checksum."""
        arrays = {"ids": ids.astype(self.dtypes["ids"], copy=False),
                  "vals": vals.astype(self.dtypes["vals"], copy=False)}
        if self.tail:
            arrays["tail"] = tail.astype(self.dtypes["tail"], copy=False)
        arrays["crc"] = np.array(row_checksum(sample_id, arrays["ids"], arrays["vals"],
                                              arrays.get("tail")), CRC)
        for kind, a in arrays.items():
            n = self.row_bytes[kind]
            if os.pwrite(self._fd(shard, kind), np.ascontiguousarray(a).tobytes(), row * n) != n:
                raise OSError(f"{self.directory / self.stems[shard]}.{kind}: short write")
            self._dirty.add((shard, kind))

    def flush(self) -> None:
        """Sync the files written since the last flush (evicted ones were synced then), at
        once: the syncs of a part's files overlap (each waits on the disk, not the CPU)."""
        if self._dirty:
            with ThreadPoolExecutor(min(SYNC_THREADS, len(self._dirty))) as pool:
                list(pool.map(os.fdatasync, [self._open[key] for key in self._dirty]))
        self._dirty.clear()

    def close(self) -> None:
        self.flush()
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def __del__(self) -> None:
        for fd in getattr(self, "_open", {}).values():
            os.close(fd)
