"""Mixtures: realized proportions against the weights, each entry's own order kept, resume
and world size free, the global ids reading the right entry's tokens."""

import numpy as np
import pytest

from fbi.config import ConfigError, DataConfig, MixEntry
from fbi.data.mixture import BLOCK, MixedShards, MixtureSampler, make_sampler, schedule
from fbi.data.sampler import GlobalSampler
from fbi.data.shards import Manifest, ShardWriter, TokenShards


@pytest.mark.parametrize("weights", [[3, 1], [0.5, 0.3, 0.2], [1, 1, 1, 1, 1, 1, 1], [1, 999]])
def test_realized_proportions_match_the_weights(weights):
    sizes = [1000, 50, 70_000, 3, 10, 10, 10][: len(weights)]
    sampler = MixtureSampler(sizes, weights, seed=0)
    share = np.asarray(weights) / sum(weights)
    for start, length in [(0, 100_000), (123_457, 9_999), (10**12, 20_000)]:
        entry, _ = sampler.entries(start, start + length)
        realized = np.bincount(entry, minlength=len(weights)) / length
        # Rounding to slots of a block, plus a partial block at each end.
        assert np.abs(realized - share).max() <= 1 / BLOCK + 2 * len(weights) / length
    counts, _, _ = schedule(weights)
    assert counts.sum() == BLOCK and np.abs(counts / BLOCK - share).max() <= 1 / BLOCK


def test_each_entry_follows_its_own_order_and_resume_continues_the_mixture():
    sizes, weights = [40, 300, 7], [2, 5, 1]
    sampler = MixtureSampler(sizes, weights, seed=4)
    offsets = np.cumsum([0] + sizes)
    ids = sampler.sample_ids(0, 20_000)
    for k, n in enumerate(sizes):
        mine = ids[(ids >= offsets[k]) & (ids < offsets[k + 1])] - offsets[k]
        # Entry k's samples, in order, are its own sampler's sequence (seed + k): each of
        # its samples once per epoch of that entry, small entries repeated.
        np.testing.assert_array_equal(mine, GlobalSampler(n, 4 + k).sample_ids(0, len(mine)))
    # Resume anywhere, on another world size: the next positions of the same sequence.
    fresh = MixtureSampler(sizes, weights, seed=4)
    assert [i for r in range(4) for i in fresh.micro_batch_ids(12_000, 3, 0, r, 4)] == \
        ids[12_000:12_012].tolist()
    assert [fresh.sample_id(p) for p in (0, 4095, 4096, 19_999)] == \
        [ids[p] for p in (0, 4095, 4096, 19_999)]


def shard_set(directory, first_token: int, tokens: int) -> None:
    """A one-shard train split whose token t is ``first_token + t`` (modulo 60,000)."""
    directory.mkdir()
    writer = ShardWriter(directory, "train", np.dtype(np.uint16), 10**9)
    writer.write((first_token + np.arange(tokens)) % 60_000)
    Manifest("f", "test", 60_000, "uint16", {"train": writer.close()}, format=2).save(directory)


def test_global_ids_read_the_entry_they_name(tmp_path):
    shard_set(tmp_path / "a", 0, 8 * 10 + 1)
    shard_set(tmp_path / "b", 30_000, 8 * 25 + 1)
    cfg = DataConfig(corpus=None, seq_len=8, mix=[MixEntry(str(tmp_path / "a"), 1.0),
                                                  MixEntry(str(tmp_path / "b"), 3.0)])
    data = MixedShards([TokenShards(tmp_path / d, "train", 8) for d in ("a", "b")])
    assert data.num_samples == 35
    sampler = make_sampler(data, cfg, seed=1)
    ids = sampler.sample_ids(0, 400)
    batch = data.batch(ids)
    from_b = ids >= 10
    np.testing.assert_array_equal(batch[~from_b, 0], ids[~from_b] * 8)
    np.testing.assert_array_equal(batch[from_b, 0], 30_000 + (ids[from_b] - 10) * 8)
    assert abs(from_b.mean() - 0.75) < 0.02


def test_a_mixture_with_a_logit_cache_or_a_bad_weight_is_refused():
    with pytest.raises(ConfigError, match="data.mix: weight -1"):
        MixEntry("/x", -1.0)
    with pytest.raises(ConfigError, match="leave entry 1 no slot of 4096"):
        schedule([1.0, 1e-5])
    from fbi.configure import compose

    with pytest.raises(ConfigError, match="data.mix: a logit cache is written for one shard set"):
        compose(["teacher=cache", "teacher.path=/t", "data.mix=[{shards_dir:/a,weight:1}]"])
