"""Parameter traffic of a ZeRO-3 training step, latent route against the 1-bit route
(``zero.gather_signs``), side by side in one run.

    torchrun --standalone --nproc_per_node 2 bench/zero3_traffic.py [--model fbi_130m]
        [--vocab 32000] [--steps 3] [--seq-len 128] [--precision fp32|bf16]
        [--persistence 100000]
    python bench/zero3_traffic.py --meta fbi_130m,fbi_1p3b,fbi_7b [--vocab 32000]

``--meta``: no step, only what one gather of every binarized layer moves on each route, in
bf16, counted on models built on the meta device (so the 7B recipe costs nothing).

Builds the student under ``zero.Init`` exactly as train.py does (stage 3, gloo on CPU) once per
route and runs the same ``--steps`` forward + backward + optimizer steps on the same random
tokens after one warm-up step. Counts every parameter DeepSpeed all-gathers (each parameter's
``all_gather_coalesced``, what ZeRO-3's fetch calls, and ``all_gather``, how the persistent
ones, kept whole on every rank, are refreshed after each optimizer step) and, on the 1-bit
route, the packed signs (``fbi.sign_gather``). A rank
receives the other ranks' shares, ``(world - 1) / world`` of each gather. Prints bytes received
per step and rank (all parameters; the binarized layers' latent weights, their packed signs,
their scales), median step times, and whether both routes gave bitwise the same losses.
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

from fbi import sign_gather  # noqa: E402
from fbi.binarize.fp import DenseLinear  # noqa: E402
from fbi.configure import compose  # noqa: E402
from fbi.deepspeed_setup import build_context, deepspeed_config, init_distributed, initialize  # noqa: E402
from fbi.models import build_model  # noqa: E402


def measure(args, world: int, route: bool) -> dict:
    cfg = compose(["experiment=none", f"model={args.model}", f"model.vocab_size={args.vocab}",
                   "zero=stage3", f"precision={args.precision}", "max_steps=10",
                   f"global_batch_size={world}", "micro_batch_size=1",
                   f"data.seq_len={args.seq_len}", f"zero.gather_signs={route}",
                   f"zero.param_persistence_threshold={args.persistence}"])
    ds_config = deepspeed_config(cfg, world)
    torch.manual_seed(0)
    with build_context(cfg, ds_config):
        model = build_model(cfg.model, cfg.scheme)
    engine = initialize(model, cfg, ds_config)
    binary = [m for m in engine.module.modules()
              if isinstance(m, DenseLinear) and type(m) is not DenseLinear]
    kind = {id(m.weight): "latent" for m in binary}
    kind.update({id(getattr(m, p)): "scales" for m in binary for p in m.SCALES})
    counted = dict.fromkeys(("all", "latent", "scales", "signs"), 0)

    def counting(gather, owner, keyword):
        # all_gather(param_list=None) gathers the parameter it is called on
        def wrapped(*args, **kw):
            params = args[0] if args else kw.get(keyword)
            for q in params or [owner]:
                bytes_ = q.ds_numel * q.ds_tensor.element_size()
                counted["all"] += bytes_
                if id(q) in kind:
                    counted[kind[id(q)]] += bytes_
            return gather(*args, **kw)
        return wrapped

    for q in engine.module.parameters():
        q.all_gather_coalesced = counting(q.all_gather_coalesced, q, "params")
        # how the persistent ones are refreshed after each optimizer step
        q.all_gather = counting(q.all_gather, q, "param_list")
    gather_signs = sign_gather.gather_packed_signs

    def counting_signs(shard, group):
        packed = gather_signs(shard, group)
        counted["all"] += packed.numel()
        counted["signs"] += packed.numel()
        return packed

    sign_gather.gather_packed_signs = counting_signs
    generator = torch.Generator().manual_seed(1)
    losses, times = [], []
    try:
        for i in range(args.steps + 1):
            tokens = torch.randint(0, args.vocab, (1, args.seq_len + 1), generator=generator)
            start = time.perf_counter()
            logits = engine(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                     tokens[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
            if i == 0:  # warm-up: the first step also sets up partitions and buckets
                counted.update(dict.fromkeys(counted, 0))
            else:
                times.append(time.perf_counter() - start)
                losses.append(loss.item())
    finally:
        sign_gather.gather_packed_signs = gather_signs
    share = (world - 1) / world / args.steps  # what a rank receives, per step
    return {**{k: v * share for k, v in counted.items()}, "ms": statistics.median(times) * 1e3,
            "losses": losses, "layers": len(binary)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fbi_130m")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--persistence", type=int, default=100_000,
                        help="zero.param_persistence_threshold")
    parser.add_argument("--meta", help="comma-separated models: count on the meta device only")
    args = parser.parse_args()
    if args.meta:
        return meta_counts(args.meta.split(","), args.vocab)
    dist_info = init_distributed()
    world = dist_info.world_size
    latent, signs = measure(args, world, False), measure(args, world, True)
    torch.distributed.destroy_process_group()  # a live gloo group can abort the exit
    if not dist_info.is_main:
        return
    mib = 2**20
    print(f"{args.model}, vocab {args.vocab}, {world} ranks, ZeRO-3, {args.precision}, "
          f"{args.seq_len} tokens per rank, {latent['layers']} binarized layers; "
          "received per step and rank:")
    print("| route | all parameters | latent weights | signs | scales | step |")
    print("|---|---|---|---|---|---|")
    for name, r in (("latent", latent), ("signs", signs)):
        print(f"| {name} | {r['all'] / mib:.3f} MiB | {r['latent'] / mib:.3f} MiB | "
              f"{r['signs'] / mib:.3f} MiB | {r['scales'] / mib:.3f} MiB | {r['ms']:.0f} ms |")
    binary = {name: r["latent"] + r["signs"] + r["scales"] for name, r in
              (("latent", latent), ("signs", signs))}
    print(f"signs / latent weights: {signs['signs'] / latent['latent']:.4f} (1/16 = 0.0625); "
          f"binarized layers with their scales: {binary['signs'] / binary['latent']:.4f}; "
          f"all parameters: {signs['all'] / latent['all']:.3f}; "
          f"step time: {signs['ms'] / latent['ms']:.2f}")
    same = signs["losses"] == latent["losses"]
    print(f"losses bitwise equal over {args.steps} steps: {'yes' if same else 'NO'} "
          f"({signs['losses'][-1]!r} vs {latent['losses'][-1]!r})")


def meta_counts(models: list[str], vocab: int) -> None:
    mib = 2**20
    print(f"vocab {vocab}; one gather of every binarized layer, bf16 latent weights against "
          "packed signs + bf16 scales:")
    print("| model | binarized weights (share) | bf16 route | signs + scales | ratio |")
    print("|---|---|---|---|---|")
    for name in models:
        cfg = compose(["experiment=none", f"model={name}", f"model.vocab_size={vocab}",
                       "max_steps=1"])
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.scheme)
        binary = [m for m in model.modules()
                  if isinstance(m, DenseLinear) and type(m) is not DenseLinear]
        weights = sum(m.weight.numel() for m in binary)
        scales = sum(getattr(m, p).numel() for m in binary for p in m.SCALES)
        share = weights / sum(p.numel() for p in model.parameters())
        dense, onebit = 2 * weights, weights / 8 + 2 * scales
        print(f"| {name} | {weights / 1e6:,.1f}M ({share:.0%}) | {dense / mib:,.1f} MiB | "
              f"{onebit / mib:,.1f} MiB | {onebit / dense:.3f} |")


if __name__ == "__main__":
    main()
