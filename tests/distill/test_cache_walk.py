"""The cache's walk order (fbi.distill.cache.Walk): the writer's parts and the trainer's
lookup agree, follow the training sampler, and hold nothing of the split's size."""

import numpy as np
import pytest


@pytest.mark.parametrize("order,shuffle", [("trainer", "feistel"), ("trainer", "full"),
                                           ("sequential", "feistel")])
def test_walk_parts_are_the_writers_batches(order, shuffle):
    from fbi.distill.cache import Walk

    walk = Walk({"num_samples": 103, "part_samples": 8, "order": order, "seed": 4,
                 "shuffle": shuffle})
    parts = [walk.part_ids(p) for p in range(13)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    assert len(parts[-1]) == 103 - 12 * 8
    for p, ids in enumerate(parts):
        assert walk.parts(ids.tolist()) == [p]
    assert walk.parts([int(parts[3][0]), int(parts[1][2]), int(parts[3][1])]) == [1, 3]
    if order == "trainer":  # the trainer's epoch 0, seed and shuffle as recorded
        from fbi.data.sampler import GlobalSampler

        np.testing.assert_array_equal(np.concatenate(parts),
                                      GlobalSampler(103, 4, shuffle).sample_ids(0, 103))


def test_walk_at_amber_scale_holds_nothing_of_the_splits_size():
    """615M samples (FBI-LLM's Amber pass): a trainer's part lookup and a writer's part
    allocate a few kB, where the whole order would be 4.9 GB and its inverse as much."""
    import tracemalloc

    from fbi.distill.cache import Walk

    n = 615_000_000
    tracemalloc.start()
    try:
        walk = Walk({"num_samples": n, "part_samples": 16, "order": "trainer", "seed": 0,
                     "shuffle": "feistel"})
        ids = walk.part_ids(38_000_000)
        batch = np.random.default_rng(0).integers(0, n, 256).tolist()
        parts = walk.parts(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 500_000
    assert walk.parts(ids.tolist()) == [38_000_000]
    assert all(any(b in walk.part_ids(p) for p in parts) for b in batch)
