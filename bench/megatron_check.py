"""What checking a Megatron pair before reading it costs: the index checks of
``fbi.data.readers.check_megatron`` beside one plain pass over the same index (summing its
lengths), on a synthetic index of N sequences and a sparse ``.bin`` of the size it promises.

    .venv/bin/python bench/megatron_check.py --sequences 5000000
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from fbi.data.readers import check_megatron, read_megatron_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=5_000_000)
    parser.add_argument("--tokens-per-sequence", type=int, default=300)
    args = parser.parse_args()
    n, per = args.sequences, args.tokens_per_sequence
    with tempfile.TemporaryDirectory() as tmp:
        idx, bin_ = Path(tmp) / "c.idx", Path(tmp) / "c.bin"
        with open(idx, "wb") as f:
            f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, n + 1))
            f.write(np.full(n, per, np.int32).tobytes())
            f.write((np.arange(n, dtype=np.int64) * per * 2).tobytes())
            f.write(np.arange(n + 1, dtype=np.int64).tobytes())
        with open(bin_, "wb") as f:
            f.truncate(n * per * 2)  # sparse: the check reads only its size
        dtype, lengths, pointers, docs = read_megatron_index(idx)
        start = time.perf_counter()
        total = int(np.asarray(lengths, dtype=np.int64).sum())
        plain = time.perf_counter() - start
        start = time.perf_counter()
        check_megatron(str(bin_), idx, dtype, lengths, pointers, docs)
        checked = time.perf_counter() - start
    print(f"{n:,} sequences, {total / 1e9:.2f}B tokens, index {(34 + 20 * n + 8) / 1e6:.0f} MB")
    print(f"sum of lengths {plain:.3f} s | full check {checked:.3f} s | ratio {checked / plain:.1f}x "
          f"| {checked / n * 1e9:.0f} ns per sequence")


if __name__ == "__main__":
    main()
