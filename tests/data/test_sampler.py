"""The global order: a permutation per epoch, position-addressed, in memory independent of
the corpus size (checked by allocation, up to 10^9 samples)."""

import tracemalloc

import numpy as np
import pytest

from fbi.data.sampler import FeistelPermutation, GlobalSampler


@pytest.mark.parametrize("shuffle", ["feistel", "full"])
def test_each_epoch_visits_every_sample_once(shuffle):
    for n in [1, 2, 3, 4, 5, 7, 16, 17, 100, 1023, 1024, 1025, 65_537]:
        sampler = GlobalSampler(n, seed=3, shuffle=shuffle)
        epochs = sampler.sample_ids(0, 3 * n).reshape(3, n)
        for ids in epochs:
            np.testing.assert_array_equal(np.sort(ids), np.arange(n))
        if n >= 16:
            assert not (epochs[0] == epochs[1]).all()  # a new order each epoch
            assert not (epochs[0] == np.arange(n)).all()  # and not the identity
    n = 2_000_003  # not a power of 4: cycle walking at work
    np.testing.assert_array_equal(np.sort(GlobalSampler(n, 0).sample_ids(n, 2 * n)),
                                  np.arange(n))


def test_positions_are_addressed_alone_and_the_world_size_is_free():
    sampler = GlobalSampler(num_samples=1000, seed=3)
    whole = sampler.sample_ids(0, 3000)
    assert [GlobalSampler(1000, 3).sample_id(k) for k in (0, 999, 1000, 2345)] == \
        [whole[k] for k in (0, 999, 1000, 2345)]  # a fresh sampler: no state but the position
    np.testing.assert_array_equal(sampler.sample_ids(990, 1010), whole[990:1010])  # an epoch edge
    # One global batch of 8: (world 1, micro 4, accum 2) and (world 2, micro 2, accum 2)
    # cover the same positions; after a resume at consumed=16 on world 4 the next batch is
    # the next positions.
    one = [i for a in range(2) for i in sampler.micro_batch_ids(8, 4, a, 0, 1)]
    two = [i for a in range(2) for r in range(2) for i in sampler.micro_batch_ids(8, 2, a, r, 2)]
    assert one == two == whole[8:16].tolist()
    four = [i for r in range(4) for i in sampler.micro_batch_ids(16, 2, 0, r, 4)]
    assert four == whole[16:24].tolist()
    assert GlobalSampler(1000, 4).sample_ids(0, 50).tolist() != whole[:50].tolist()


@pytest.mark.parametrize("n", [10**9, 10**9 + 7, 3 * 10**9 + 1])
def test_a_billion_samples_without_memory_proportional_to_them(n):
    """At 10^9 samples a full permutation would hold 8 GB; here building the sampler and
    addressing positions anywhere in several epochs allocates a few kB (tracemalloc sees
    numpy's buffers). Bijectivity on samples: the inverse maps each id back to its
    position, and 10^5 consecutive positions give 10^5 distinct ids in range."""
    tracemalloc.start()
    try:
        sampler = GlobalSampler(n, seed=11)
        for start in (0, n // 2, n - 5, 5 * n - 3):
            ids = sampler.sample_ids(start, start + 4096)
            assert ids.min() >= 0 and ids.max() < n
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # a batch of 4096 ids and its temporaries, nothing of size n
    perm = FeistelPermutation(n, 12345)
    positions = np.random.default_rng(0).integers(0, n, 100_000)
    np.testing.assert_array_equal(perm.inverse(perm.forward(positions)), positions)
    run = GlobalSampler(n, 5).sample_ids(n - 50_000, n + 50_000)
    assert len(np.unique(run[:50_000])) == 50_000 and len(np.unique(run[50_000:])) == 50_000


def test_the_full_shuffle_is_the_previous_order():
    """data.shuffle=full reproduces the order runs started before the Feistel network used:
    numpy's permutation seeded by seed + epoch."""
    sampler = GlobalSampler(500, 9, shuffle="full")
    np.testing.assert_array_equal(sampler.sample_ids(500, 1000),
                                  np.random.default_rng(10).permutation(500))


@pytest.mark.parametrize("shuffle", ["feistel", "full"])
def test_epoch_positions_invert_the_order(shuffle):
    sampler = GlobalSampler(1025, seed=2, shuffle=shuffle)
    for epoch in (0, 1):
        ids = sampler.sample_ids(epoch * 1025, (epoch + 1) * 1025)
        np.testing.assert_array_equal(sampler.epoch_positions(ids, epoch), np.arange(1025))
