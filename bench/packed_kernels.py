"""One packed 1-bit layer against torch's dense paths: decode (batch 1) and prefill.

    python bench/packed_kernels.py [--in-features 2048] [--out-features 5632] [--prefill 512]

An FBI-Linear layer (the paper's column layout) of random weights: ``PackedLinear`` (the
compiled CPU kernel) against ``x @ W^T`` in fp32 and bf16 with W dense. Prints ms per call
(median of interleaved repeats, so that a busy machine slows every path alike), ratios
against the packed path, the weight bytes each path reads per call, and the largest relative
error of the packed output (decode: the kernel's masked adds; prefill: torch's int8 GEMM on the
signs and the inputs' int8 pieces). Then the output head (``--vocab`` x in, bf16 as a packed
export stores it) at decode: ``StoredHead``'s fp32 sums over the bf16 weights (the ``packed``
column) against the same weights widened to fp32 and torch's bf16 product. ``--crossover`` also times the two routes against each
other by token count: the measurement behind ``fbi.kernels.cpu.PREFILL_TOKENS``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fbi.binarize import SCHEMES, scheme_config  # noqa: E402
from fbi.kernels import cpu  # noqa: E402
from fbi.kernels.linear import PackedLinear  # noqa: E402
from fbi.kernels.stored import StoredHead  # noqa: E402


def median_ms(fns: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm up: the first call builds or loads the kernel and touches the weights
    for _ in range(repeats):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--out-features", type=int, default=5632)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--vocab", type=int, default=32000, help="the output head's rows")
    parser.add_argument("--crossover", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d_in, d_out = args.in_features, args.out_features
    layer = SCHEMES["fbi"](d_in, d_out, init_std=0.02, cfg=scheme_config("fbi"))
    packed = PackedLinear(layer, layer.pack())
    w32 = type(layer).unpack(layer.pack())
    w16 = w32.bfloat16()
    print(f"FBI-Linear {d_in} -> {d_out}, {args.threads} threads, CPU kernel path "
          f"{cpu.extension().simd_path()}; weight bytes read per call: packed "
          f"{packed.bits.numel():,} (+{4 * 2 * d_in:,} scales), fp32 {4 * w32.numel():,}, "
          f"bf16 {2 * w32.numel():,}")
    print(f"{'shape':>12} {'packed ms':>10} {'fp32 ms':>9} {'bf16 ms':>9} {'fp32/packed':>12} "
          f"{'bf16/packed':>12} {'max rel err':>12}")
    with torch.no_grad():
        for label, n in (("decode", 1), (f"prefill {args.prefill}", args.prefill)):
            x = torch.randn(n, d_in)
            xb = x.bfloat16()
            ms = median_ms({"packed": lambda: packed(x), "fp32": lambda: x @ w32.T,
                            "bf16": lambda: xb @ w16.T}, args.repeats if n == 1 else 3)
            want = x.double() @ w32.double().T
            err = float(((packed(x).double() - want).abs().max() / want.abs().max()))
            print(f"{label:>12} {ms['packed']:10.3f} {ms['fp32']:9.3f} {ms['bf16']:9.3f} "
                  f"{ms['fp32'] / ms['packed']:12.2f} {ms['bf16'] / ms['packed']:12.2f} {err:12.2e}")
        # the output head as a packed export stores it (bf16, run with fp32 sums) at decode
        head_bf16 = torch.randn(args.vocab, d_in).bfloat16()
        head = StoredHead(torch.nn.Parameter(head_bf16, requires_grad=False))
        head32 = head_bf16.float()
        x = torch.randn(1, d_in)
        xb = x.bfloat16()
        ms = median_ms({"packed": lambda: head(x), "fp32": lambda: x @ head32.T,
                        "bf16": lambda: xb @ head_bf16.T}, args.repeats)
        want = x.double() @ head32.double().T
        err = float(((head(x).double() - want).abs().max() / want.abs().max()))
        print(f"{'head decode':>12} {ms['packed']:10.3f} {ms['fp32']:9.3f} {ms['bf16']:9.3f} "
              f"{ms['fp32'] / ms['packed']:12.2f} {ms['bf16'] / ms['packed']:12.2f} {err:12.2e}")
        if args.crossover:
            print(f"\ntokens  masked adds ms  int8 GEMM ms   "
                  f"(PREFILL_TOKENS = {cpu.PREFILL_TOKENS})")
            bits = packed.bits
            for n in (1, 4, 16, 32, 64, 256):
                u = torch.randn(n, 8 * bits.shape[1])
                ms = median_ms({"kernel": lambda: cpu.sign_matmul(bits, u),
                                "int8": lambda: cpu.int8_matmul(bits, u)}, 5)
                print(f"{n:6d} {ms['kernel']:15.3f} {ms['int8']:13.3f}")


if __name__ == "__main__":
    main()
