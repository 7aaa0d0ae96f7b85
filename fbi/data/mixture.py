"""Mixtures of shard sets with weights (``data.mix``), as Megatron's blends and OLMo's mixes.

Position ``p`` of the run goes to entry ``k`` by a fixed schedule of ``BLOCK`` slots: entry
``k`` holds ``n_k`` of them (its weight's share, by largest remainder), spread evenly through
the block (slot ``j`` of ``k`` at ``(j + 1/2) / n_k`` of the block). The position within entry
``k`` is ``(p // BLOCK) * n_k + j``, which that entry's own per-epoch permutation
(``fbi.data.sampler``, seed ``seed + k``) turns into one of its samples. So the mixture is a
function of the position alone: deterministic, resumable on any world size, with realized
proportions within ``1/BLOCK`` of the weights (after rounding the weights to slots), and an
entry smaller than its share is repeated, epoch after epoch, like a blend's upsampled source.

Sample ids are global: entry ``k``'s sample ``i`` is ``offset_k + i``, the entries' train
splits numbered one after the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fbi.config import ConfigError, DataConfig
from fbi.data.sampler import GlobalSampler
from fbi.data.shards import TokenShards

BLOCK = 4096


def schedule(weights: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots per entry, entry of each slot, rank of each slot within its entry) for one
    block of ``BLOCK`` positions."""
    w = np.asarray(weights, dtype=np.float64)
    share = w / w.sum() * BLOCK
    small = np.flatnonzero(share < 1)
    # Refused exactly when a weight is below 1/BLOCK of the total: at or above it the floor
    # alone gives a slot, below it a slot would depend on the other weights' remainders.
    if small.size:
        k = int(small[0])
        raise ConfigError(f"data.mix: weights {[float(x) for x in weights]} give entry {k} {share[k]:.3g} "
                          f"of the {BLOCK} slots of a block, so no slot; each weight must be at "
                          f"least 1/{BLOCK} of the total (here {w.sum() / BLOCK:.6g}): raise it "
                          "or drop the entry")
    counts = np.floor(share).astype(np.int64)
    # Largest remainders get the slots left (ties to the earlier entry).
    order = np.lexsort((np.arange(len(w)), -(share - counts)))
    counts[order[: BLOCK - counts.sum()]] += 1
    entry = np.concatenate([np.full(n, k) for k, n in enumerate(counts)])
    rank = np.concatenate([np.arange(n) for n in counts])
    time = (rank + 0.5) / np.repeat(np.maximum(counts, 1), counts)
    slots = np.lexsort((entry, time))
    return counts, entry[slots], rank[slots]


class MixtureSampler:
    """Position -> global sample id over several entries; the interface of GlobalSampler."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int,
                 shuffle: str = "feistel") -> None:
        self.counts, self.entry, self.rank = schedule(weights)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.samplers = [GlobalSampler(n, seed + k, shuffle) for k, n in enumerate(sizes)]

    def entries(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(entry, position within the entry) of run positions ``start .. stop - 1``."""
        p = np.arange(start, stop, dtype=np.int64)
        slot = p % BLOCK
        k = self.entry[slot]
        return k, (p // BLOCK) * self.counts[k] + self.rank[slot]

    def sample_ids(self, start: int, stop: int) -> np.ndarray:
        k, local = self.entries(start, stop)
        out = np.empty(len(k), dtype=np.int64)
        for e in np.unique(k):
            where = np.flatnonzero(k == e)
            # Positions of one entry inside a batch are consecutive in its own order.
            ids = self.samplers[e].sample_ids(int(local[where[0]]), int(local[where[-1]]) + 1)
            out[where] = self.offsets[e] + ids[local[where] - local[where[0]]]
        return out

    def sample_id(self, position: int) -> int:
        return int(self.sample_ids(position, position + 1)[0])

    micro_batch_ids = GlobalSampler.micro_batch_ids


class MixedShards:
    """The train splits of several shard sets as one dataset of global sample ids."""

    def __init__(self, parts: list[TokenShards]) -> None:
        self.parts = parts
        self.sizes = [p.num_samples for p in parts]
        self._starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.seq_len = parts[0].seq_len

    @property
    def num_samples(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[k][index - int(self._starts[k])]

    def batch(self, ids) -> np.ndarray:
        return np.stack([self[i] for i in ids])


def mix_dirs(cfg: DataConfig) -> list[Path]:
    return [Path(m.shards_dir).expanduser() for m in cfg.mix]


def open_train(cfg: DataConfig, shards: Path) -> TokenShards | MixedShards:
    """The train split: of ``shards``, or with ``data.mix`` of every entry."""
    if not cfg.mix:
        return TokenShards(shards, "train", cfg.seq_len, cfg.verify_checksums)
    parts = [TokenShards(d, "train", cfg.seq_len, cfg.verify_checksums) for d in mix_dirs(cfg)]
    dtypes = {p.manifest.tokenizer_fingerprint for p in parts}
    if len(dtypes) > 1:
        raise ConfigError(f"data.mix: the entries were tokenized with different tokenizers "
                          f"({sorted(dtypes)}); mix shards of one tokenizer")
    return MixedShards(parts)


def make_sampler(data: TokenShards | MixedShards, cfg: DataConfig, seed: int):
    if isinstance(data, MixedShards):
        return MixtureSampler(data.sizes, [m.weight for m in cfg.mix], seed, cfg.shuffle)
    return GlobalSampler(data.num_samples, seed, cfg.shuffle)
