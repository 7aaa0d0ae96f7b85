"""Training-step time of the binary student against the same model in full precision.

    python bench/binary_vs_fp.py [--model fbi_tiny] [--vocab 49152] [--seq-len 128] [--batch 4]

Both models are built and timed in one process, alternating steps (forward, backward, AdamW
step) so that both see the same machine state; prints the median step times and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbi.config import compose  # noqa: E402
from fbi.models import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fbi_tiny")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    cfg = compose([f"model={args.model}", f"model.vocab_size={args.vocab}"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {}
    for scheme in ("fbi", "fp"):
        torch.manual_seed(0)
        model = build_model(cfg.model, scheme, cfg.scheme.binarize).to(device)
        models[scheme] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)
    times = {k: [] for k in models}
    for step in range(args.steps + 2):
        for scheme, (model, opt) in models.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                     tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= 2:  # first steps warm allocators and kernels
                times[scheme].append(time.perf_counter() - start)
    fbi, fp = (statistics.median(times[k]) for k in ("fbi", "fp"))
    print(f"{args.model} vocab {args.vocab}, batch {args.batch} x {args.seq_len}, {device}: "
          f"binary {fbi * 1e3:.1f} ms/step, full precision {fp * 1e3:.1f} ms/step, "
          f"ratio {fbi / fp:.3f}")


if __name__ == "__main__":
    main()
