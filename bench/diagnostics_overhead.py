"""What the binary diagnostics cost: one measurement against one training step.

    python bench/diagnostics_overhead.py [--model fbi_tiny] [--vocab 49152] [--batch 4]
                                         [--seq-len 128] [--steps 6]

The student (no teacher) takes forward + backward + AdamW steps on random tokens; after
each, the diagnostics measure the model (sign flips, weights near zero, scale statistics).
Both are timed in the same process, alternating, so they see the same machine state. The
overhead of ``logging.diagnostics_every=N`` is one measurement per N steps.
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

from fbi.callbacks.diagnostics import BinaryDiagnostics  # noqa: E402
from fbi.config import SchemeConfig  # noqa: E402
from fbi.models.llama import ModelConfig  # noqa: E402
from fbi.models import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fbi_tiny")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from omegaconf import OmegaConf

    fields = OmegaConf.load(REPO / "conf" / "model" / f"{args.model}.yaml")
    cfg = ModelConfig(**{k: v for k, v in fields.items() if k != "defaults"},
                      vocab_size=args.vocab)
    torch.manual_seed(0)
    model = build_model(cfg, SchemeConfig(name="fbi"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    diagnostics = BinaryDiagnostics(model, 1, 0, 1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1))
    step_s, measure_s = [], []
    for _ in range(args.steps + 1):  # the first round warms up
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        middle = time.perf_counter()
        diagnostics.measure()
        step_s.append(middle - start)
        measure_s.append(time.perf_counter() - middle)
    step, measure = statistics.median(step_s[1:]), statistics.median(measure_s[1:])
    binary = sum(m.weight.numel() for group in diagnostics.groups.values() for m in group)
    print(f"{args.model}: {binary / 1e6:.1f}M binary weights; step {step * 1e3:.0f} ms, "
          f"diagnostics {measure * 1e3:.0f} ms = {measure / step:.2f} steps; overhead at "
          f"diagnostics_every=50: {measure / step / 50:.2%}, every 10: {measure / step / 10:.2%}")


if __name__ == "__main__":
    main()
