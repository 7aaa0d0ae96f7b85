"""Token shards: flat uint16/uint32 files, memory-mapped, described by a manifest.

``manifest.json`` records the tokenizer fingerprint, the dtype, and per shard its token
count and sha256, so that a shard from another tokenizer, a truncated file or a flipped
byte is refused with a message instead of silently training on garbage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fbi.config import ConfigError

MANIFEST = "manifest.json"


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
    documents: dict[str, list[int]] = field(default_factory=dict)  # document ids per split

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits[split])

    def save(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=1))

    @staticmethod
    def load(directory: Path) -> "Manifest":
        try:
            raw = json.loads((directory / MANIFEST).read_text())
            raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
            return Manifest(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ConfigError(
                f"data.shards_dir: {directory / MANIFEST} is not a shard manifest ({err!r}); "
                "delete the folder to tokenize again, or point data.shards_dir at the shards"
            ) from None


class ShardWriter:
    """Appends token arrays to a split, cutting a new file every ``shard_tokens`` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self._file = None
        self._filled = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self._filled == self.shard_tokens:
                self._roll()
            room = self.shard_tokens - self._filled
            self._file.write(tokens[:room].tobytes())
            self._filled += min(room, len(tokens))
            tokens = tokens[room:]

    def _roll(self) -> None:
        self._close_current()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self.shards.append(ShardInfo(name, 0, ""))
        self._filled = 0

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            info = self.shards[-1]
            info.tokens = self._filled
            info.sha256 = sha256_file(self.directory / info.file)
            self._file = None

    def close(self) -> list[ShardInfo]:
        self._close_current()
        return self.shards


class ShardCorruption(RuntimeError):
    pass


class TokenShards:
    """One split, read as fixed-length samples of ``seq_len + 1`` tokens.

    Sample ``i`` never crosses a shard boundary, so each one is a single memmap slice.
    """

    def __init__(self, directory: Path, split: str, seq_len: int, verify: bool = True) -> None:
        directory = Path(directory)
        if not (directory / MANIFEST).exists():
            raise FileNotFoundError(
                f"data.shards_dir: {directory} has no {MANIFEST}; prepare the shards first "
                "(train.py does it when data.corpus or data.files is set)"
            )
        self.manifest = Manifest.load(directory)
        if split not in self.manifest.splits:
            raise ShardCorruption(f"{directory / MANIFEST} has no {split!r} split")
        self.seq_len = seq_len
        dtype = np.dtype(self.manifest.dtype)
        self._arrays, counts = [], []
        self._infos = self.manifest.splits[split]
        for info in self._infos:
            path = directory / info.file
            self._check(path, info, dtype, verify)
            self._arrays.append(np.memmap(path, dtype=dtype, mode="r"))
            counts.append(max(0, (info.tokens - 1) // seq_len))
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.num_samples == 0:
            raise ConfigError(
                f"data.seq_len: the {split!r} split of {directory} holds fewer than "
                f"{seq_len + 1} tokens per shard; lower data.seq_len or add text"
            )

    @staticmethod
    def _check(path: Path, info: ShardInfo, dtype: np.dtype, verify: bool) -> None:
        fix = f"delete {path.parent} to rebuild it from the corpus"
        if not path.exists():
            raise ShardCorruption(f"shard {path} listed in the manifest is missing; {fix}")
        size = path.stat().st_size
        if size != info.tokens * dtype.itemsize:
            raise ShardCorruption(
                f"shard {path} has {size} bytes, the manifest says {info.tokens} tokens "
                f"({info.tokens * dtype.itemsize} bytes): truncated or replaced; {fix}"
            )
        if verify and sha256_file(path) != info.sha256:
            raise ShardCorruption(f"shard {path} fails its sha256 checksum: corrupt; {fix}")

    def check_ids(self, vocab_size: int) -> None:
        """Refuse ids outside the vocabulary (one pass over the split: meant for validation,
        whose ids would otherwise crash only at the final evaluation)."""
        for arr, info in zip(self._arrays, self._infos):
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
        return np.asarray(self._arrays[shard][offset : offset + self.seq_len + 1], dtype=np.int64)

    def batch(self, ids) -> np.ndarray:
        """(len(ids), seq_len + 1) int64: inputs are ``[:, :-1]``, next tokens ``[:, 1:]``."""
        return np.stack([self[i] for i in ids])
