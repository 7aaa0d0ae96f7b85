"""Token shards: flat uint16/uint32 files, memory-mapped, described by a manifest.

``manifest.json`` records the tokenizer fingerprint, the dtype, and per shard its token
count and sha256. Its size grows with the number of shards, never with the number of
documents: where documents begin is kept in binary side files (``*.docs``, see ``DOCS``).

A start checks what is cheap (the manifest, each shard's size, the tokenizer fingerprint):
constant time in the corpus size. The checksums are computed once, while the shards are
written, and compared on demand by ``python -m fbi data verify`` (split over ranks under
torchrun), so a flipped byte is found by a command, not by every start of every rank.

Format 1 (before document side files) listed every document id in the manifest. Such
shards still load; ``python -m fbi data convert DIR`` moves the ids into side files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fbi.atomic import write_text
from fbi.config import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 2
# A document side file: int64 rows, one per document, columns named in the manifest entry.
# Written by preparation: (input file number, row in that file, first token's offset in the
# stream of shards the side file belongs to). Written by ``convert``: (document id,).
DOCS_DTYPE = np.dtype("<i8")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    file: str
    tokens: int
    sha256: str


@dataclass
class Manifest:
    tokenizer_fingerprint: str
    tokenizer_source: str
    vocab_size: int
    dtype: str
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # what the tokens were made from
    # Per split, the side files of document boundaries: {"file", "columns", "count"} each.
    # Format 1 held the document ids themselves here (a list of ints per split).
    documents: dict[str, list] = field(default_factory=dict)
    format: int = 1

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits[split])

    def save(self, directory: Path) -> None:
        write_text(directory / MANIFEST, json.dumps(asdict(self), indent=1))

    @staticmethod
    def load(directory: Path) -> "Manifest":
        if not (directory / MANIFEST).is_file():
            what = "is not a folder" if not directory.is_dir() else f"has no {MANIFEST}"
            raise ConfigError(
                f"data.shards_dir: {directory} {what}; name a folder of prepared shards "
                "(python -m fbi data prepare writes one)"
            )
        try:
            raw = json.loads((directory / MANIFEST).read_text())
            raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
            manifest = Manifest(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ConfigError(
                f"data.shards_dir: {directory / MANIFEST} is not a shard manifest ({err!r}); "
                "delete the folder to tokenize again, or point data.shards_dir at the shards"
            ) from None
        if manifest.format == 1 and any(manifest.documents.values()):
            log.warning("%s lists every document id (format 1): read at every start; "
                        "python -m fbi data convert %s moves them into side files",
                        directory / MANIFEST, directory)
        if manifest.format > FORMAT:
            raise ConfigError(
                f"data.shards_dir: {directory / MANIFEST} has format {manifest.format}, newer "
                f"than this fbi reads ({FORMAT}); update fbi"
            )
        return manifest

    def document_table(self, directory: Path, split: str) -> np.ndarray:
        """(documents, columns) int64, the split's side files concatenated (memory-mapped
        when there is one file); format 1 ids as one column."""
        entries = self.documents.get(split, [])
        if self.format == 1:
            return np.asarray(entries, dtype=np.int64).reshape(-1, 1)
        tables = [np.memmap(directory / e["file"], dtype=DOCS_DTYPE, mode="r").reshape(
            -1, len(e["columns"])) if e["count"] else np.zeros((0, len(e["columns"])), np.int64)
            for e in entries]
        return tables[0] if len(tables) == 1 else np.concatenate(tables)


class ShardWriter:
    """Appends token arrays to a stream of shards, cutting a new file every ``shard_tokens``
    tokens; each file's sha256 is computed from the bytes as they are written."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.prefix, self.dtype = directory, prefix, dtype
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self.written = 0  # tokens over all of this writer's shards
        self._file = None
        self._hash = None
        self._filled = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self._filled == self.shard_tokens:
                self._roll()
            room = self.shard_tokens - self._filled
            block = tokens[:room].tobytes()
            self._file.write(block)
            self._hash.update(block)
            taken = min(room, len(tokens))
            self._filled += taken
            self.written += taken
            tokens = tokens[room:]

    def _roll(self) -> None:
        self._close_current()
        name = f"{self.prefix}_{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append(ShardInfo(name, 0, ""))
        self._filled = 0

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1].tokens = self._filled
            self.shards[-1].sha256 = self._hash.hexdigest()
            self._file = None

    def close(self) -> list[ShardInfo]:
        self._close_current()
        return self.shards


class ShardCorruption(ConfigError):
    """A shard folder damaged since it was written: refused like any bad input."""


def _fix(directory: Path) -> str:
    return f"delete {directory} to rebuild it from the corpus"


def check_sizes(directory: Path, manifest: Manifest, shards: list[ShardInfo]) -> None:
    """Every listed shard exists with the size the manifest gives it (a stat per shard)."""
    itemsize = np.dtype(manifest.dtype).itemsize
    for info in shards:
        path = directory / info.file
        if not path.exists():
            raise ShardCorruption(f"shard {path} listed in the manifest is missing; "
                                  f"{_fix(directory)}")
        size = path.stat().st_size
        if size != info.tokens * itemsize:
            raise ShardCorruption(
                f"shard {path} has {size} bytes, the manifest says {info.tokens} tokens "
                f"({info.tokens * itemsize} bytes): truncated or replaced; {_fix(directory)}"
            )


def verify_checksums(directory: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Hash this rank's share of the shards (every split; shards ``rank, rank + world, ...``
    in manifest order) against the manifest. Returns one message per bad shard."""
    manifest = Manifest.load(directory)
    listed = [info for shards in manifest.splits.values() for info in shards]
    bad = []
    for info in listed[rank::world]:
        path = directory / info.file
        try:
            check_sizes(directory, manifest, [info])
        except ShardCorruption as err:
            bad.append(str(err))
            continue
        if sha256_file(path) != info.sha256:
            bad.append(f"shard {path} fails its sha256 checksum: corrupt; {_fix(directory)}")
    return bad


class TokenShards:
    """One split, read as fixed-length samples of ``seq_len + 1`` tokens.

    Sample ``i`` never crosses a shard boundary, so each one is a single memmap slice.
    Opening reads the manifest and stats the shards; a shard is mapped on first use.
    ``verify=True`` also hashes every shard of the split (reads every byte).
    """

    def __init__(self, directory: Path, split: str, seq_len: int, verify: bool = False) -> None:
        directory = Path(directory)
        if not (directory / MANIFEST).exists():
            raise FileNotFoundError(
                f"data.shards_dir: {directory} has no {MANIFEST}; prepare the shards first "
                "(python -m fbi data prepare, or train.py when data.corpus or data.files is set)"
            )
        self.directory = directory
        self.manifest = Manifest.load(directory)
        if split not in self.manifest.splits:
            raise ShardCorruption(f"{directory / MANIFEST} has no {split!r} split")
        self.seq_len = seq_len
        self._dtype = np.dtype(self.manifest.dtype)
        self._infos = self.manifest.splits[split]
        check_sizes(directory, self.manifest, self._infos)
        if verify:
            for info in self._infos:
                if sha256_file(directory / info.file) != info.sha256:
                    raise ShardCorruption(f"shard {directory / info.file} fails its sha256 "
                                          f"checksum: corrupt; {_fix(directory)}")
        self._arrays: list[np.memmap | None] = [None] * len(self._infos)
        counts = [max(0, (info.tokens - 1) // seq_len) for info in self._infos]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.num_samples == 0:
            raise ConfigError(
                f"data.seq_len: the {split!r} split of {directory} holds fewer than "
                f"{seq_len + 1} tokens per shard; lower data.seq_len or add text"
            )

    def _array(self, shard: int) -> np.ndarray:
        if self._arrays[shard] is None:
            self._arrays[shard] = np.memmap(self.directory / self._infos[shard].file,
                                            dtype=self._dtype, mode="r")
        return self._arrays[shard]

    def check_ids(self, vocab_size: int, max_samples: int | None = None) -> None:
        """Refuse ids outside the vocabulary in the first ``max_samples`` samples (all when
        None): the samples an evaluation reads, whose ids would otherwise crash it only at
        the end of training. Bounded, so a start costs the same on any corpus."""
        last = self.num_samples if max_samples is None else min(max_samples, self.num_samples)
        for shard, info in enumerate(self._infos):
            start = int(self._starts[shard])
            if start >= last:
                break
            rows = min(last, int(self._starts[shard + 1])) - start
            arr = self._array(shard)[: rows * self.seq_len + 1]
            top = int(arr.max()) if len(arr) else 0
            if top >= vocab_size:
                raise ShardCorruption(
                    f"shard {info.file} holds token id {top}, outside the vocabulary of "
                    f"{vocab_size}: built with another tokenizer or corrupt; delete its folder "
                    "to rebuild it from the corpus"
                )

    @property
    def num_samples(self) -> int:
        return int(self._starts[-1])

    @property
    def samples_per_shard(self) -> list[int]:
        return np.diff(self._starts).tolist()

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, sample number within the shard) of global sample ``index``."""
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def __getitem__(self, index: int) -> np.ndarray:
        shard, row = self.locate(index)
        offset = row * self.seq_len
        return np.asarray(self._array(shard)[offset : offset + self.seq_len + 1], dtype=np.int64)

    def batch(self, ids) -> np.ndarray:
        """(len(ids), seq_len + 1) int64: inputs are ``[:, :-1]``, next tokens ``[:, 1:]``."""
        return np.stack([self[i] for i in ids])
