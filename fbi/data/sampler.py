"""Deterministic order of samples, addressed by a global position.

Position ``k`` of the run (``k = 0, 1, ...`` over all ranks and steps) maps to a sample id
through a per-epoch permutation seeded by ``seed`` and the epoch. The only state is the
number of samples consumed so far, so a run resumes on any world size with the next unseen
samples, and a logit cache can use the same sample ids.

The permutation (``data.shuffle=feistel``, the default) is computed per position, in memory
that does not depend on the number of samples: a keyed Feistel network is a bijection of
``[0, 4^h)``, the smallest such range holding ``[0, N)``; an output at or beyond ``N`` is fed
through again ("cycle walking", Black and Rogaway 2002) until it lands inside, which keeps it
a bijection of ``[0, N)`` and takes fewer than 4 rounds of the network on average, since
``4^h < 4N``. ``data.shuffle=full`` is the order of runs started before: numpy's permutation
of the whole epoch, held in memory (8 bytes a sample).
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """Sebastiano Vigna's splitmix64 output function: one 64-bit word to a well-mixed one."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix64(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 of ``x ^ key`` on uint64 arrays (multiplications wrap modulo 2^64)."""
    x = (x ^ np.uint64(key)) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A seeded bijection of ``[0, n)``, evaluated per element (``forward``) and inverted
    (``inverse``); memory O(1) in ``n``, time O(1) expected per element."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        self.half = max(1, (int(n - 1).bit_length() + 1) // 2)  # bits per half: 4^half >= n
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = []
        state = key & _M64
        for _ in range(ROUNDS):
            state = splitmix64(state)
            self.keys.append(state)

    def _rounds(self, x: np.ndarray, keys: list[int], forward: bool) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for key in keys:
            if forward:  # (L, R) -> (R, L ^ F(R))
                left, right = right, left ^ (mix64(right, key) & self.mask)
            else:  # (L, R) -> (R ^ F(L), L)
                left, right = right ^ (mix64(left, key) & self.mask), left
        return (left << shift) | right

    def _walk(self, x: np.ndarray, forward: bool) -> np.ndarray:
        keys = self.keys if forward else self.keys[::-1]
        x = np.asarray(x, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index {int(x.max())} outside [0, {self.n})")
        y = self._rounds(x, keys, forward)
        outside = np.flatnonzero(y >= np.uint64(self.n))
        while outside.size:
            y[outside] = self._rounds(y[outside], keys, forward)
            outside = outside[y[outside] >= np.uint64(self.n)]
        return y.astype(np.int64)

    def forward(self, index: np.ndarray) -> np.ndarray:
        return self._walk(index, True)

    def inverse(self, value: np.ndarray) -> np.ndarray:
        return self._walk(value, False)


class GlobalSampler:
    def __init__(self, num_samples: int, seed: int, shuffle: str = "feistel") -> None:
        if shuffle not in ("feistel", "full"):
            raise ValueError(f"data.shuffle: {shuffle!r}; use feistel or full")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._perm = None
        self._inverse, self._inverse_epoch = None, -1  # shuffle=full's inverse, when asked

    def _permutation(self, epoch: int):
        if epoch != self._epoch:
            if self.shuffle == "full":
                self._perm = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
            else:
                self._perm = FeistelPermutation(self.num_samples,
                                                splitmix64(self.seed & _M64) ^ epoch)
            self._epoch = epoch
        return self._perm

    def sample_ids(self, start: int, stop: int) -> np.ndarray:
        """int64 sample ids of positions ``start .. stop - 1`` (any span of epochs)."""
        out = np.empty(stop - start, dtype=np.int64)
        position = start
        while position < stop:
            epoch, index = divmod(position, self.num_samples)
            take = min(stop - position, self.num_samples - index)
            indices = np.arange(index, index + take, dtype=np.int64)
            perm = self._permutation(epoch)
            out[position - start: position - start + take] = (
                perm[indices] if self.shuffle == "full" else perm.forward(indices))
            position += take
        return out

    def epoch_positions(self, sample_ids, epoch: int = 0) -> np.ndarray:
        """Where ``sample_ids`` come within ``epoch`` (0 .. num_samples - 1): the inverse of
        ``sample_ids`` over one epoch."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        perm = self._permutation(epoch)
        if self.shuffle == "feistel":
            return perm.inverse(ids)
        if self._inverse_epoch != epoch:  # the legacy order: O(N), as its permutation
            self._inverse = np.empty_like(perm)
            self._inverse[perm] = np.arange(self.num_samples)
            self._inverse_epoch = epoch
        return self._inverse[ids]

    def sample_id(self, position: int) -> int:
        return int(self.sample_ids(position, position + 1)[0])

    def micro_batch_ids(
        self, consumed: int, micro: int, accum_index: int, rank: int, world: int
    ) -> list[int]:
        """Ids of one rank's micro-batch within the global batch starting at ``consumed``.

        A global batch is ``micro * world * accum`` consecutive positions; micro-batch
        ``accum_index`` of ``rank`` takes the slice ``(accum_index * world + rank) * micro``.
        """
        start = consumed + (accum_index * world + rank) * micro
        return self.sample_ids(start, start + micro).tolist()
