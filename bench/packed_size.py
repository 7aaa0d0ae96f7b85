"""Size of the packed 1-bit export per scheme, without training (sizes do not depend on the
weights' values: even PB-LLM keeps a fixed number of salient weights).

    python bench/packed_size.py [--model fbi_130m] [--vocab 32000] [--schemes fbi,bitnet,...]

Builds the model of ``conf/model/<model>.yaml`` with each scheme, computes what
``python -m fbi export --format packed`` would write (``fbi.export.packed.packed_tensors``),
and prints bits per binarized weight, the binarized part and the whole model against bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbi.binarize import SCHEMES  # noqa: E402
from fbi.configure import compose  # noqa: E402
from fbi.export.packed import DTYPES, packed_tensors  # noqa: E402
from fbi.models import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fbi_130m")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--schemes", default=",".join(s for s in SCHEMES if s != "fp"))
    p.add_argument("--fp-dtype", default="bfloat16", help="storage of the full-precision parts")
    args = p.parse_args()
    print(f"{args.model}, vocab {args.vocab}, full-precision parts in {args.fp_dtype}\n")
    print("| scheme | bits / binarized weight | binarized part: packed vs bf16 | "
          "whole model: packed vs bf16 |")
    print("|---|---|---|---|")
    for scheme in args.schemes.split(","):
        cfg = compose([f"model={args.model}", f"scheme={scheme}", "experiment=none",
                       "max_steps=1", f"model.vocab_size={args.vocab}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.scheme, cfg.scheme.binarize)
        _, _, s = packed_tensors(model, DTYPES[args.fp_dtype])
        mb = 1e6
        print(f"| {scheme} | {s['bits_per_binarized_weight']:.3f} | "
              f"{s['binarized_bytes'] / mb:.1f} MB vs {s['binarized_bf16_bytes'] / mb:.1f} MB "
              f"({s['binarized_bytes'] / s['binarized_bf16_bytes']:.3f}) | "
              f"{s['total_bytes'] / mb:.1f} MB vs {s['bf16_bytes'] / mb:.1f} MB "
              f"({s['total_bytes'] / s['bf16_bytes']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
