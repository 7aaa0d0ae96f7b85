"""How the Mamba-2 chunked scan's time grows with sequence length, beside causal attention.

    python bench/scan_vs_attention.py [--lengths 256,512,1024,2048,4096] [--heads 8]
                                      [--head-dim 64] [--state 64] [--chunk 64] [--device cpu]

Forward + backward of ``fbi.models.ssd.chunked_scan`` (heads x head_dim channels, one B/C
group of ``--state``) and of ``torch.nn.functional.scaled_dot_product_attention`` (causal,
the same heads and head dim), batch 1, float32; median of a few repetitions. The scan is
linear in length (quadratic only inside a chunk), attention quadratic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fbi.models.ssd import chunked_scan  # noqa: E402


def timed(fn, inputs, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        for t in inputs:
            t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*inputs).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="256,512,1024,2048,4096")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--state", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    h, p, n, dev = args.heads, args.head_dim, args.state, args.device
    print(f"{'length':>7} {'scan ms':>9} {'attention ms':>13} {'scan/attn':>10}")
    for length in (int(v) for v in args.lengths.split(",")):
        x = torch.randn(1, length, h, p, device=dev, requires_grad=True)
        dt = F.softplus(torch.randn(1, length, h, device=dev)).requires_grad_()
        A = (-torch.rand(h, device=dev)).requires_grad_()
        Bm, Cm = (torch.randn(1, length, 1, n, device=dev, requires_grad=True) for _ in range(2))
        D = torch.ones(h, device=dev, requires_grad=True)
        scan_ms = timed(lambda *t: chunked_scan(*t, chunk_size=args.chunk),
                        [x, dt, A, Bm, Cm, D], dev, args.repeats)
        q, k, v = (torch.randn(1, h, length, p, device=dev, requires_grad=True) for _ in range(3))
        attn_ms = timed(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True),
                        [q, k, v], dev, args.repeats)
        print(f"{length:>7} {scan_ms:>9.1f} {attn_ms:>13.1f} {scan_ms / attn_ms:>10.2f}")


if __name__ == "__main__":
    main()
