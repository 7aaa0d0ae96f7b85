"""Deterministic order of samples, addressed by a global position.

Position ``k`` of the run (``k = 0, 1, ...`` over all ranks and steps) maps to a sample id
through a per-epoch permutation seeded by ``seed + epoch``. The only state is the number
of samples consumed so far, so a run resumes on any world size with the next unseen
samples, and a logit cache can use the same sample ids.
"""

from __future__ import annotations

import numpy as np


class GlobalSampler:
    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def sample_id(self, position: int) -> int:
        epoch, index = divmod(position, self.num_samples)
        if epoch != self._epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
            self._epoch = epoch
        return int(self._perm[index])

    def micro_batch_ids(
        self, consumed: int, micro: int, accum_index: int, rank: int, world: int
    ) -> list[int]:
        """Ids of one rank's micro-batch within the global batch starting at ``consumed``.

        A global batch is ``micro * world * accum`` consecutive positions; micro-batch
        ``accum_index`` of ``rank`` takes the slice ``(accum_index * world + rank) * micro``.
        """
        start = consumed + (accum_index * world + rank) * micro
        return [self.sample_id(p) for p in range(start, start + micro)]
