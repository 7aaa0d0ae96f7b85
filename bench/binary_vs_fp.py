"""Every scheme against full precision: bits per weight, step time, memory kept for backward.

    python bench/binary_vs_fp.py [--model fbi_tiny] [--vocab 49152] [--seq-len 128] [--batch 4]
                                 [--precision fp32|bf16] [--layer-tokens 4096]
                                 [--schemes fbi,bitnet,...] [--parts model,layer,rebuild]
                                 [--zero 0|1|2|3]

Part 1, the whole student: each scheme's model is built and timed in one process, in two
interleaved rounds (forward, backward, AdamW step) so that all see the same machine state
(with ``--zero``, through the DeepSpeed engine train.py builds, at that stage);
prints median step times, their ratio to ``fp``, and the peak memory of a training step
(GPU: ``max_memory_allocated``; CPU: the peak resident set of a child process that builds the
model and takes two steps, less what it held before building; meaningful for models of
hundreds of MB, where the step's peak exceeds the imports'). Part 2, one layer shape: a SwiGLU MLP 768 -> 2048 -> 768
over ``--layer-tokens`` tokens, forward + backward, per scheme, and the official FBI-LLM
formulation as autograd composes it (``alpha * (W + (sign(W) - W).detach()) + beta``, then a
plain linear) as the baseline. "kept" is the memory autograd holds from forward to backward
(distinct storages of saved tensors), in multiples of the MLP's weights. Part 3 (``rebuild``):
FBI's effective-weight pass eager and under ``torch.compile``, against the matmul it feeds.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbi.binarize import SCHEMES, scheme_config  # noqa: E402
from fbi.binarize.fp import DenseLinear  # noqa: E402
from fbi.configure import compose  # noqa: E402
from fbi.models import build_model  # noqa: E402


class OfficialFBI(DenseLinear):
    """FBI-LLM as usually written: composed STE, effective weight and sign kept for backward."""

    def __init__(self, n_in: int, n_out: int, init_std: float = 0.02, cfg=None) -> None:
        super().__init__(n_in, n_out, init_std)
        self.alpha = nn.Parameter(self.weight.detach().abs().mean(0, keepdim=True))
        self.beta = nn.Parameter(self.weight.detach().mean(0, keepdim=True))

    def forward(self, x):
        w = self.weight
        binary = w + (torch.sign(w) - w).detach()
        return nn.functional.linear(x, self.alpha * binary + self.beta)


class SwiGLU(nn.Module):
    def __init__(self, layer_cls, cfg, d: int = 768, f: int = 2048) -> None:
        super().__init__()
        self.gate = layer_cls(d, f, init_std=0.02, cfg=cfg)
        self.up = layer_cls(d, f, init_std=0.02, cfg=cfg)
        self.down = layer_cls(f, d, init_std=0.02, cfg=cfg)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def kept_bytes(fn, params) -> int:
    """Bytes of distinct storages autograd saves during ``fn()``, parameters (and views of
    them) excluded: they exist anyway."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return sum(seen.values())


def timed(fn, steps: int, sync) -> float:
    times = []
    for step in range(steps + 2):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bits(model: nn.Module) -> float:
    layers = [m for m in model.modules() if isinstance(m, DenseLinear) and type(m) is not DenseLinear]
    if not layers:
        return 16.0  # full precision exported in bf16
    n = sum(m.weight.numel() for m in layers)
    return sum(m.bits_per_weight() * m.weight.numel() for m in layers) / n


def student_step(cfg, scheme: str, batch: int, seq_len: int, precision: str, device: str,
                 zero: tuple[str, int] | None = None):
    """(model, one training step of it: forward, cross-entropy, backward, AdamW); with
    ``zero=(model name, stage)``, the DeepSpeed engine train.py builds, in ``precision``."""
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq_len + 1), device=device)
    if zero is not None:
        return engine_step(*zero, cfg.model.vocab_size, scheme, tokens, precision)
    model = build_model(cfg.model, scheme_config(scheme), cfg.scheme.binarize).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast(device, precision):
            logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def build_engine(model_name: str, stage: int, vocab: int, scheme: str, batch: int,
                 seq_len: int, precision: str, *overrides: str):
    """The DeepSpeed engine train.py builds, in a process group of one (gloo on CPU, NCCL on
    GPU); ``overrides``: more of train.py's."""
    from fbi.deepspeed_setup import build_context, deepspeed_config, init_distributed, initialize

    if not torch.distributed.is_initialized():
        init_distributed()
    run = compose(["experiment=none", f"model={model_name}", f"model.vocab_size={vocab}",
                   f"scheme={scheme}", f"zero=stage{stage}", f"precision={precision}",
                   "max_steps=10", f"global_batch_size={batch}", f"micro_batch_size={batch}",
                   f"data.seq_len={seq_len}", "optim.warmup_steps=1", *overrides])
    ds_config = deepspeed_config(run, 1)
    with build_context(run, ds_config):
        model = build_model(run.model, run.scheme)
    return initialize(model, run, ds_config)


def engine_step(model_name: str, stage: int, vocab: int, scheme: str, tokens: torch.Tensor,
                precision: str):
    engine = build_engine(model_name, stage, vocab, scheme, tokens.shape[0],
                          tokens.shape[1] - 1, precision)

    def step():
        logits = engine(tokens[:, :-1])
        engine.backward(nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                    tokens[:, 1:].flatten()))
        engine.step()

    return engine.module, step


def autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


def zero(args) -> tuple[str, int] | None:
    return None if args.zero is None else (args.model, args.zero)


def cpu_peak_mb(model: str, vocab: int, scheme: str, batch: int, seq_len: int, precision: str,
                stage: int | None) -> float:
    """In a child process: resident-set peak of building the model and two steps, in MB."""
    torch.set_num_threads(1)
    os.environ.pop("MASTER_PORT", None)  # the parent's process group's; this one forms its own
    cfg = compose([f"model={model}", f"model.vocab_size={vocab}"])
    page_kb = resource.getpagesize() / 1024
    with open("/proc/self/statm") as f:  # resident now: the peak so far may be an import's
        before_kb = int(f.read().split()[1]) * page_kb
    _, step = student_step(cfg, scheme, batch, seq_len, precision, "cpu",
                           None if stage is None else (model, stage))
    step()
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024


def peak_mb(args, cfg, scheme: str, device: str) -> float:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _, step = student_step(cfg, scheme, args.batch, args.seq_len, args.precision, device,
                               zero(args))
        step()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(cpu_peak_mb, (args.model, args.vocab, scheme, args.batch,
                                        args.seq_len, args.precision, args.zero))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fbi_tiny")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layer-tokens", type=int, default=4096)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast forward (the latent weights stay fp32)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3),
                        help="model part: DeepSpeed engines at this ZeRO stage, as train.py "
                             "builds them (bf16: DeepSpeed's bf16 weights), one process")
    parser.add_argument("--parts", default="model,layer",
                        help="comma-separated: model, layer, rebuild")
    args = parser.parse_args()
    schemes = ["fp"] + [s for s in args.schemes.split(",") if s != "fp"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if "model" in args.parts:
        cfg = compose([f"model={args.model}", f"model.vocab_size={args.vocab}"])
        student_bench(args, cfg, schemes, device, sync)
    if "layer" in args.parts:
        layer_bench(args, schemes, device, sync)
    if "rebuild" in args.parts:
        rebuild_bench(args, device, sync)
    if torch.distributed.is_initialized():  # --zero; a live gloo group can abort the exit
        torch.distributed.destroy_process_group()


def student_bench(args, cfg, schemes: list[str], device: str, sync) -> None:
    step_times, bit_counts = {}, {}
    for _ in range(2):  # two interleaved rounds, best of both, to even out the shared machine
        for scheme in schemes:
            model, step = student_step(cfg, scheme, args.batch, args.seq_len, args.precision,
                                       device, zero(args))
            t = timed(step, args.steps, sync)
            step_times[scheme] = min(t, step_times.get(scheme, t))
            if args.zero == 3:  # partitioned weights: count the bits on a whole copy
                model = build_model(cfg.model, scheme_config(scheme), cfg.scheme.binarize)
            bit_counts[scheme] = bits(model)
            del model, step
    peaks = {scheme: peak_mb(args, cfg, scheme, device) for scheme in schemes}
    engine = "plain AdamW" if args.zero is None else f"DeepSpeed ZeRO-{args.zero}"
    print(f"{args.model} vocab {args.vocab}, batch {args.batch} x {args.seq_len}, "
          f"{args.precision}, {engine}, {device}, {torch.get_num_threads()} threads")
    print(f"{'scheme':<12}{'bits/weight':>12}{'ms/step':>10}{'vs fp':>8}{'peak MB':>10}{'vs fp':>8}")
    for s, t in step_times.items():
        print(f"{s:<12}{bit_counts[s]:>12.3f}{t * 1e3:>10.1f}{t / step_times['fp']:>8.2f}"
              f"{peaks[s]:>10.0f}{peaks[s] / peaks['fp']:>8.2f}")


def layer_bench(args, schemes: list[str], device: str, sync) -> None:
    x = torch.randn(args.layer_tokens, 768, device=device)
    rows = {}
    for name in ["fp", "official_fbi"] + [s for s in schemes if s != "fp"]:
        torch.manual_seed(0)
        cls = OfficialFBI if name == "official_fbi" else SCHEMES[name]
        mlp = SwiGLU(cls, scheme_config("fbi" if name == "official_fbi" else name)).to(device)
        weight_bytes = sum(m.weight.numel() * m.weight.element_size()
                           for m in (mlp.gate, mlp.up, mlp.down))
        xr = x.clone().requires_grad_()

        def forward():
            with autocast(device, args.precision):
                return mlp(xr)

        def fwd_bwd():
            forward().float().sum().backward()

        kept = kept_bytes(forward, list(mlp.parameters()))
        rows[name] = (timed(fwd_bwd, args.steps, sync), kept / weight_bytes)
    print(f"\nSwiGLU MLP 768/2048, {args.layer_tokens} tokens, forward + backward, "
          f"{args.precision}, {device}")
    print("kept: saved for backward beyond fp's (x, activations), in multiples of the weights")
    print(f"{'layer':<14}{'ms':>8}{'vs fp':>8}{'vs official':>13}{'kept':>8}")
    for name, (t, kept) in rows.items():
        print(f"{name:<14}{t * 1e3:>8.1f}{t / rows['fp'][0]:>8.2f}"
              f"{t / rows['official_fbi'][0]:>13.2f}{kept - rows['fp'][1]:>8.2f}")


def rebuild_bench(args, device: str, sync) -> None:
    """FBI's effective-weight pass (``copysign`` + ``addcmul``, run once in forward and once in
    backward) eager and under ``torch.compile``, against the forward matmul it feeds."""
    from fbi.binarize.fbi import _effective

    w = torch.randn(2048, 768, device=device)
    alpha, beta = torch.rand(1, 768, device=device), torch.randn(1, 768, device=device) * 0.01
    x = torch.randn(args.layer_tokens, 768, device=device)
    compiled = torch.compile(_effective, dynamic=False)
    print(f"\nFBI effective weight 2048 x 768 (x2 per step) vs one forward matmul over "
          f"{args.layer_tokens} tokens, {device}")
    print(f"{'dtype':<10}{'eager ms':>10}{'compiled ms':>13}{'matmul ms':>11}{'eager/matmul':>14}"
          f"{'bitwise':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        same = all(torch.equal(a, b) for a, b in zip(_effective(w, alpha, beta, dtype),
                                                     compiled(w, alpha, beta, dtype)))
        eager = timed(lambda: _effective(w, alpha, beta, dtype), 20, sync)
        fused = timed(lambda: compiled(w, alpha, beta, dtype), 20, sync)
        xd, wd = x.to(dtype), w.to(dtype)
        matmul = timed(lambda: xd @ wd.T, args.steps, sync)
        print(f"{str(dtype).split('.')[1]:<10}{eager * 1e3:>10.2f}{fused * 1e3:>13.2f}"
              f"{matmul * 1e3:>11.1f}{eager / matmul:>14.3f}{'yes' if same else 'no':>9}")


if __name__ == "__main__":
    main()
