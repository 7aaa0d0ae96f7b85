"""Parameter traffic of a ZeRO-3 training step: what the all-gathers move, and what of it the
binarized layers' latent weights are.

    torchrun --standalone --nproc_per_node 2 bench/zero3_traffic.py [--model fbi_130m]
        [--vocab 32000] [--steps 2] [--seq-len 128] [--precision fp32|bf16]

Builds the student under ``zero.Init`` exactly as train.py does (stage 3, gloo on CPU), runs
``--steps`` forward + backward + optimizer steps on random tokens, and counts every parameter
DeepSpeed all-gathers (each parameter's ``all_gather_coalesced``, what ZeRO-3's fetch calls;
small parameters DeepSpeed keeps persistent are never gathered). A rank receives the other
ranks' shares, ``(world - 1) / world`` of each gathered parameter. Prints the bytes received per
step and rank, the binarized latent weights' part of them, and what the same gathers would
move as packed signs (1 bit) plus the layers' scales in the training dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbi.binarize.fp import DenseLinear  # noqa: E402
from fbi.config import compose  # noqa: E402
from fbi.deepspeed_setup import build_context, deepspeed_config, init_distributed, initialize  # noqa: E402
from fbi.models import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fbi_130m")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    dist_info = init_distributed()
    world = dist_info.world_size
    cfg = compose(["experiment=none", f"model={args.model}", f"model.vocab_size={args.vocab}",
                   "zero=stage3", f"precision={args.precision}", "max_steps=10",
                   f"global_batch_size={world}", "micro_batch_size=1",
                   f"data.seq_len={args.seq_len}"])
    ds_config = deepspeed_config(cfg, world)
    torch.manual_seed(0)
    with build_context(cfg, ds_config):
        model = build_model(cfg.model, cfg.scheme)
    engine = initialize(model, cfg, ds_config)
    tokens = torch.randint(0, args.vocab, (1, args.seq_len + 1))
    binary = [m for m in engine.module.modules()
              if isinstance(m, DenseLinear) and type(m) is not DenseLinear]
    latent_ids = {id(m.weight) for m in binary}
    scale_of = {id(m.weight): sum(getattr(m, p).ds_numel for p in m.SCALES) for m in binary}
    counted = {"all": 0, "latent": 0, "latent_scales": 0, "gathers": 0}

    def counting(gather):
        def wrapped(params, *a, **kw):
            for q in params:
                counted["all"] += q.ds_numel
                counted["gathers"] += 1
                if id(q) in latent_ids:
                    counted["latent"] += q.ds_numel
                    counted["latent_scales"] += scale_of[id(q)]
            return gather(params, *a, **kw)
        return wrapped

    for q in engine.module.parameters():
        q.all_gather_coalesced = counting(q.all_gather_coalesced)

    def step():
        logits = engine(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()

    step()  # warm-up: the first step also sets up partitions and buckets
    counted.update(all=0, latent=0, latent_scales=0, gathers=0)
    for _ in range(args.steps):
        step()
    element = 2 if args.precision == "bf16" else 4
    received = (world - 1) / world * element / args.steps  # bytes per gathered element
    total, latent = counted["all"] * received, counted["latent"] * received
    onebit = (counted["latent"] / 8 / element + counted["latent_scales"]) * received
    if dist_info.is_main:
        mib = 2 ** 20
        print(f"{args.model}, vocab {args.vocab}, {world} ranks, ZeRO-3, {args.precision}, "
              f"{args.seq_len} tokens per rank; per step and rank "
              f"({counted['gathers'] / args.steps:.0f} parameter gathers):")
        print(f"  all-gathered parameters received: {total / mib:.1f} MiB")
        print(f"  of which binarized latent weights:  {latent / mib:.1f} MiB ({latent / total:.0%})")
        print(f"  the same as packed signs + scales:  {onebit / mib:.1f} MiB "
              f"({onebit / latent:.3f} of the dense latent route)")
        print(f"  step total with the 1-bit route:    {(total - latent + onebit) / mib:.1f} MiB "
              f"({(total - latent + onebit) / total:.2f} of today's)")


if __name__ == "__main__":
    main()
