"""Traffic of a ZeRO-3 training step, latent route against the 1-bit route
(``zero.gather_signs``), side by side in one run.

    torchrun --standalone --nproc_per_node 2 bench/zero3_traffic.py [--model fbi_130m]
        [--vocab 32000] [--steps 3] [--seq-len 128] [--precision fp32|bf16]
        [--grad-dtype model|fp32] [--checkpointing] [--persistence 100000]
    python bench/zero3_traffic.py --meta fbi_130m,fbi_1p3b,fbi_7b [--vocab 32000]
    python bench/zero3_traffic.py --recipes fbi_7b,bimamba_2p7b --world 256 [--vocab 32000]

``--meta``: no step, only what one gather of every binarized layer moves on each route, in
bf16, counted on models built on the meta device (so the 7B recipe costs nothing).
``--recipes``: the whole step of each ZeRO-3 recipe on ``--world`` ranks, per rank, from the
meta-device model and ZeRO-3's schedule: per micro-batch, the partitioned 16-bit parameters
gathered twice on the plain route (forward, and backward or its recomputation: a 7B model
exceeds DeepSpeed's ``stage3_max_live_parameters``, so nothing stays gathered in between),
the binarized ones' packed signs once on the 1-bit route, every gradient reduce-scattered once;
per step, the persistent parameters refreshed once.

Builds the student under ``zero.Init`` exactly as train.py does (stage 3, gloo on CPU) once per
route and runs the same ``--steps`` forward + backward + optimizer steps on the same random
tokens after one warm-up step. Two counters:

- around ``torch.distributed`` (``bench/comm_counter.py``, installed before DeepSpeed is
  imported): every byte a rank receives, by collective: parameters all-gathered, packed signs
  all-gathered (the 1-bit route's ``uint8`` gathers), gradients reduce-scattered, all-reduces;
- at DeepSpeed's parameters (each one's ``all_gather_coalesced``, what ZeRO-3's fetch calls,
  and ``all_gather``, how the persistent ones are refreshed after each optimizer step): which
  of the gathered parameters are the binarized layers' latent weights and their scales.

Prints bytes received per step and rank, median step times, and whether both routes gave
bitwise the same losses.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import comm_counter  # noqa: I001  (bench/, beside this script)

comm_counter.install()  # before DeepSpeed is imported

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbi.binarize.fp import DenseLinear  # noqa: E402
from fbi.configure import compose  # noqa: E402
from fbi.deepspeed_setup import build_context, deepspeed_config, init_distributed, initialize  # noqa: E402
from fbi.models import build_model  # noqa: E402
from fbi.process_exit import run_and_exit  # noqa: E402


def measure(args, world: int, route: bool) -> dict:
    cfg = compose(["experiment=none", f"model={args.model}", f"model.vocab_size={args.vocab}",
                   "zero=stage3", f"precision={args.precision}", "max_steps=10",
                   f"global_batch_size={world}", "micro_batch_size=1",
                   f"data.seq_len={args.seq_len}", f"zero.gather_signs={route}",
                   f"zero.grad_dtype={args.grad_dtype}",
                   f"zero.activation_checkpointing={args.checkpointing}",
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
    counted = dict.fromkeys(("latent", "scales"), 0)

    def counting(gather, owner, keyword):
        # all_gather(param_list=None) gathers the parameter it is called on
        def wrapped(*args, **kw):
            params = args[0] if args else kw.get(keyword)
            for q in params or [owner]:
                if id(q) in kind:
                    counted[kind[id(q)]] += q.ds_numel * q.ds_tensor.element_size()
            return gather(*args, **kw)
        return wrapped

    for q in engine.module.parameters():
        q.all_gather_coalesced = counting(q.all_gather_coalesced, q, "params")
        # how the persistent ones are refreshed after each optimizer step
        q.all_gather = counting(q.all_gather, q, "param_list")
    generator = torch.Generator().manual_seed(1)
    losses, times = [], []
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
            comm_counter.reset()
        else:
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    share = (world - 1) / world / args.steps  # what a rank receives, per step
    return {**{k: v * share for k, v in counted.items()},
            **{k: v / args.steps for k, v in comm_counter.counts.items()},
            "gathers": comm_counter.calls["params"] / args.steps,
            "sign_gathers": comm_counter.calls["signs"] / args.steps,
            "ms": statistics.median(times) * 1e3, "losses": losses, "layers": len(binary)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fbi_130m")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", choices=("fp32", "bf16", "bf16_mixed"), default="bf16")
    parser.add_argument("--grad-dtype", choices=("model", "fp32"), default="model",
                        help="zero.grad_dtype: reduce-scatter bf16 gradients as they are, or fp32")
    parser.add_argument("--checkpointing", action="store_true",
                        help="zero.activation_checkpointing=true (every block recomputed)")
    parser.add_argument("--persistence", type=int, default=100_000,
                        help="zero.param_persistence_threshold")
    parser.add_argument("--meta", help="comma-separated models: count on the meta device only")
    parser.add_argument("--recipes", help="comma-separated experiments: their whole step")
    parser.add_argument("--world", type=int, default=256, help="ranks, with --recipes")
    args = parser.parse_args()
    if args.meta:
        return meta_counts(args.meta.split(","), args.vocab)
    if args.recipes:
        return recipe_counts(args.recipes.split(","), args.vocab, args.world)
    dist_info = init_distributed()
    world = dist_info.world_size
    latent, signs = measure(args, world, False), measure(args, world, True)
    torch.distributed.destroy_process_group()
    if not dist_info.is_main:
        return
    mib = 2**20
    print(f"{args.model}, vocab {args.vocab}, {world} ranks, ZeRO-3, {args.precision}, "
          f"gradients reduced in {args.grad_dtype}, activation checkpointing "
          f"{'on' if args.checkpointing else 'off'}, {args.seq_len} tokens per rank, "
          f"{latent['layers']} binarized layers; received per step and rank:")
    print("| route | parameters gathered | of which binarized latent | their scales | signs "
          "| gradients reduce-scattered | all-reduce | whole step | collectives | step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in (("latent", latent), ("signs", signs)):
        whole = r["params"] + r["signs"] + r["grads"] + r["allreduce"]
        r["whole"] = whole
        print(f"| {name} | {r['params'] / mib:.3f} MiB | {r['latent'] / mib:.3f} MiB | "
              f"{r['scales'] / mib:.3f} MiB | {r['signs'] / mib:.3f} MiB | "
              f"{r['grads'] / mib:.3f} MiB | {r['allreduce'] / mib:.3f} MiB | "
              f"{whole / mib:.3f} MiB | {r['gathers']:.0f} + {r['sign_gathers']:.0f} signs | "
              f"{r['ms']:.0f} ms |")
    print(f"signs / latent weights: {signs['signs'] / latent['latent']:.4f} (1/16 = 0.0625); "
          f"parameters gathered: {(signs['params'] + signs['signs']) / latent['params']:.3f}; "
          f"whole step: {signs['whole'] / latent['whole']:.3f}; "
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


def recipe_counts(recipes: list[str], vocab: int, world: int) -> None:
    gib, share = 2**30, (world - 1) / world
    print(f"{world} ranks, vocab {vocab}; GiB received per rank and optimizer step (micro-batches "
          "per rank and step: the average); gradients in the recipe's dtype, and in bf16 where "
          "the parameters are bf16:")
    print("| recipe | precision | micro-batches | parameters: plain | 1-bit route | gradients "
          "| bf16 | whole step: plain | route | route, bf16 gradients |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in recipes:
        cfg = compose([f"experiment={name}", f"model.vocab_size={vocab}", "max_steps=1",
                       "teacher.path=/unused", "data.shards_dir=/unused"])
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.scheme)
        threshold = cfg.zero.param_persistence_threshold
        routed = {id(m.weight) for m in model.modules()
                  if isinstance(m, DenseLinear) and m.SIGN_ONLY and m.weight.numel() > threshold}
        params = {id(p): p.numel() for p in model.parameters()}  # tied weights once
        signs = sum(params[i] for i in routed)
        gathered = sum(n for n in params.values() if n > threshold)
        persistent = sum(n for n in params.values() if n <= threshold)
        total = sum(params.values())
        width = 2 if cfg.precision in ("bf16", "fp16") else 4  # bf16_mixed: fp32 parameters
        grad_width = 4 if width == 4 or cfg.zero.grad_dtype == "fp32" else 2
        micro = cfg.global_batch_size / (world * cfg.micro_batch_size)
        plain = (2 * width * gathered * micro + width * persistent) * share
        route = (2 * width * (gathered - signs) * micro + signs / 8 * micro
                 + width * persistent) * share
        grads = total * grad_width * micro * share
        bf16 = total * 2 * micro * share if width == 2 else None
        print(f"| {name} | {cfg.precision} | {micro:g} | {plain / gib:.2f} | {route / gib:.2f} | "
              f"{grads / gib:.2f} | {'–' if bf16 is None else f'{bf16 / gib:.2f}'} | "
              f"{(plain + grads) / gib:.2f} | {(route + grads) / gib:.2f} "
              f"({(route + grads) / (plain + grads):.2f}×) | " + (
                  "–" if bf16 is None else
                  f"{(route + bf16) / gib:.2f} ({(route + bf16) / (plain + grads):.2f}×)") + " |")

if __name__ == "__main__":
    run_and_exit(main)
