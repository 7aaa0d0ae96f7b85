"""GPU acceptance: what only a CUDA device can show, in one table (run by bench/gpu_check.sh).

    python bench/gpu_check.py [--seq-len 2048] [--batch-130m 8] [--batch-1p3b 4] [--steps 5]

Rows (each a check that passes or fails, with its figures):

- the suite's CUDA-only tests (skipped on CPU machines), through pytest;
- mamba-ssm: its fused kernels against fbi's chunked scan in torch (``fbi.models.ssd``) on
  the same inputs: largest difference relative to the output's scale, and the time ratio;
  skipped when mamba-ssm is not installed (image built without WITH_MAMBA=1);
- packed 1-bit layer: the Triton kernel (``fbi.kernels.triton_sign``) of a 2048 x 5632
  FBI-Linear layer at decode (1 token) and prefill (512) against torch's dense fp32 and bf16
  products: ms, ratios, and its error against float64 (PASS below 1e-4);
- fbi_130m bf16: one training step (forward, backward, fused Adam) of the DeepSpeed engine
  train.py builds (ZeRO-1), full precision against FBI-LLM's binarized layers: step time,
  ratio, tokens/s and MFU (the GPU's bf16 peak from ``fbi.flops``);
- fbi_1p3b bf16: the same for the 1.3B student (FBI scheme): tokens/s and MFU;
- 1-bit route: ZeRO-3 with ``zero.gather_signs`` against the plain ZeRO-3 gather on CUDA
  tensors: the logits must be bitwise equal; step time ratio;
- distillation: the fbi_130m student with an online teacher (a LLaMA of SmolLM2-360M's shape,
  random weights: its cost does not depend on them) computing dense logits every step,
  against sparse top-64 targets as a logit cache holds them (encoded once on the GPU; the
  cache's disk read is not included): tokens/s of both.

Everything runs in this one process on ``cuda:0`` with random tokens; about 3-5 minutes on
an H100. Without a GPU it prints why and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
from binary_vs_fp import build_engine, timed  # noqa: E402

from fbi.config import compose  # noqa: E402
from fbi.distill.cache_writer import encode_topk  # noqa: E402
from fbi.distill.loss import distillation_loss  # noqa: E402
from fbi.distill.targets import SparseTargets  # noqa: E402
from fbi.flops import mfu, peak_flops  # noqa: E402
from fbi.models import architecture  # noqa: E402
from fbi.models.ssd import chunked_scan, mamba_ssm_kernel, mamba_ssm_scan  # noqa: E402

VOCAB = 32000  # LLaMA-2's tokenizer, as the FBI-LLM recipes
DEVICE = "cuda"
ROWS: list[tuple[str, str, str]] = []


def row(check: str, verdict: str, figures: str) -> None:
    ROWS.append((check, verdict, figures))
    print(f"  {check}: {verdict} {figures}", file=sys.stderr, flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def lm_step(engine, tokens, targets=None):
    """One engine step on ``tokens`` (B, S+1): cross-entropy, or distillation towards
    ``targets()`` (dense logits or SparseTargets) when given."""
    def step():
        logits = engine(tokens[:, :-1])
        teacher = None if targets is None else targets()
        loss = distillation_loss(logits, teacher, tokens[:, 1:]).loss
        engine.backward(loss)
        engine.step()
    return step


def throughput(name: str, scheme: str, stage: int, batch: int, args, *overrides: str):
    """(seconds per step, tokens/s, MFU or None) of one engine configuration."""
    engine = build_engine(name, stage, VOCAB, scheme, batch, args.seq_len, "bf16", *overrides)
    tokens = torch.randint(0, VOCAB, (batch, args.seq_len + 1), device=DEVICE)
    seconds = timed(lm_step(engine, tokens), args.steps, sync)
    tokens_per_s = batch * args.seq_len / seconds
    peak = peak_flops(torch.device(DEVICE))
    model = compose([f"model={name}", f"model.vocab_size={VOCAB}"]).model
    per_token = architecture(model).flops_per_token(model, args.seq_len)
    util = mfu(tokens_per_s, per_token, 1, peak) if peak else None
    del engine
    torch.cuda.empty_cache()
    return seconds, tokens_per_s, util


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def check_cuda_tests(args) -> None:
    """The suite's tests that skip without a GPU (they compare against references there)."""
    tests = ["tests/models/test_mamba2.py::test_mamba_ssm_kernels_equal_the_chunked_scan",
             "tests/kernels/test_triton_sign.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-rs", *tests],
                          cwd=BENCH.parent, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    row("CUDA-only tests (pytest)", "PASS" if proc.returncode == 0 else "FAIL", summary)


def check_mamba(args) -> None:
    if mamba_ssm_kernel() is None:
        row("mamba-ssm kernel vs torch scan", "SKIP", "mamba-ssm not installed (WITH_MAMBA=1)")
        return
    g = torch.Generator(device=DEVICE).manual_seed(0)
    b, length, heads, hd, state = 2, args.seq_len, 24, 64, 128
    x = torch.randn(b, length, heads, hd, device=DEVICE, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, length, heads, device=DEVICE, generator=g))
    A = -torch.rand(heads, device=DEVICE, generator=g) - 0.5
    Bm = torch.randn(b, length, 1, state, device=DEVICE, generator=g)
    Cm = torch.randn(b, length, 1, state, device=DEVICE, generator=g)
    D = torch.randn(heads, device=DEVICE, generator=g)
    inputs = (x, dt, A, Bm, Cm, D)
    ours = chunked_scan(*inputs, chunk_size=64)
    theirs = mamba_ssm_scan(*inputs, chunk_size=64)
    error = ((ours - theirs).abs().max() / ours.abs().max()).item()
    t_ours = timed(lambda: chunked_scan(*inputs, chunk_size=64), args.steps, sync)
    t_theirs = timed(lambda: mamba_ssm_scan(*inputs, chunk_size=64), args.steps, sync)
    row("mamba-ssm kernel vs torch scan", "PASS" if error < 1e-3 else "FAIL",
        f"max rel. diff {error:.1e}; kernel {t_theirs * 1e3:.1f} ms, torch {t_ours * 1e3:.1f} ms "
        f"(x{t_ours / t_theirs:.1f})")


def packed_layer_timings(in_features: int = 2048, out_features: int = 5632, tokens=(1, 512),
                         repeats: int = 20) -> list[dict]:
    """Per token count: ms of the Triton kernel (through ``PackedLinear``, FBI's column
    layout, on cuda:0) and of torch's dense fp32 and bf16 products, and the packed output's
    largest error relative to the float64 product."""
    from fbi.binarize import SCHEMES, scheme_config
    from fbi.kernels.linear import PackedLinear

    torch.manual_seed(0)
    layer = SCHEMES["fbi"](in_features, out_features, init_std=0.02, cfg=scheme_config("fbi"))
    packed = PackedLinear(layer, layer.pack()).to(DEVICE)
    w32 = type(layer).unpack(layer.pack()).to(DEVICE)
    w16 = w32.bfloat16()

    def ms(fn) -> float:  # back to back, one sync: a decode call is microseconds
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return 1e3 * (time.perf_counter() - start) / repeats

    out = []
    with torch.no_grad():
        for n in tokens:
            x = torch.randn(n, in_features, device=DEVICE)
            want = x.double() @ w32.double().T
            err = float((packed(x).double() - want).abs().max() / want.abs().max())
            xb = x.bfloat16()
            out.append({"tokens": n, "packed_ms": ms(lambda: packed(x)),
                        "fp32_ms": ms(lambda: x @ w32.T), "bf16_ms": ms(lambda: xb @ w16.T),
                        "max_rel_err": err})
    return out


def check_packed_kernels(args) -> None:
    """The Triton kernel of packed 1-bit layers (fbi.kernels.triton_sign) on a 2048 x 5632
    FBI-Linear layer, decode and a 512-token prefill, against torch's dense fp32 and bf16."""
    for r in packed_layer_timings(repeats=args.steps * 10):
        row(f"packed 1-bit layer, {r['tokens']} tokens", "PASS" if r["max_rel_err"] < 1e-4 else "FAIL",
            f"triton {r['packed_ms']:.3f} ms, fp32 {r['fp32_ms']:.3f} ms (x{r['fp32_ms'] / r['packed_ms']:.1f}), "
            f"bf16 {r['bf16_ms']:.3f} ms (x{r['bf16_ms'] / r['packed_ms']:.1f}); "
            f"max rel. err {r['max_rel_err']:.1e}")


def check_130m(args) -> None:
    fp = throughput(args.small, "fp", 1, args.batch_130m, args)
    fbi = throughput(args.small, "fbi", 1, args.batch_130m, args)
    row(f"{args.small} bf16 step, fbi vs fp", "PASS" if math.isfinite(fbi[0]) else "FAIL",
        f"fp {fp[0] * 1e3:.0f} ms ({fp[1]:,.0f} tok/s, MFU {pct(fp[2])}), fbi {fbi[0] * 1e3:.0f} ms "
        f"({fbi[1]:,.0f} tok/s, MFU {pct(fbi[2])}): x{fbi[0] / fp[0]:.2f}")


def check_1p3b(args) -> None:
    seconds, tokens_per_s, util = throughput(args.large, "fbi", 1, args.batch_1p3b, args,
                                             "zero.activation_checkpointing=true")
    row(f"{args.large} bf16 step (fbi)", "PASS", f"{seconds * 1e3:.0f} ms, {tokens_per_s:,.0f} tok/s, "
        f"MFU {pct(util)} (batch {args.batch_1p3b} x {args.seq_len}, act. checkpointing)")


def check_sign_route(args) -> None:
    results = {}
    for gather in (False, True):
        torch.manual_seed(0)  # the same initial weights for both routes
        engine = build_engine(args.small, 3, VOCAB, "fbi", args.batch_130m, args.seq_len, "bf16",
                              f"zero.gather_signs={str(gather).lower()}")
        tokens = torch.randint(0, VOCAB, (args.batch_130m, args.seq_len + 1), device=DEVICE,
                               generator=torch.Generator(device=DEVICE).manual_seed(1))
        with torch.no_grad():
            logits = engine(tokens[:, :-1]).float().cpu()
        results[gather] = (logits, timed(lm_step(engine, tokens), args.steps, sync))
        del engine
        torch.cuda.empty_cache()
    same = torch.equal(results[False][0], results[True][0])
    ratio = results[True][1] / results[False][1]
    row("1-bit sign route (ZeRO-3, CUDA)", "PASS" if same else "FAIL",
        f"logits {'bitwise equal' if same else 'DIFFER'}; step x{ratio:.2f} of the plain gather")


def check_distillation(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(  # SmolLM2-360M's shape, LLaMA-2's vocabulary
        vocab_size=VOCAB, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=args.seq_len,
    )).to(DEVICE, torch.bfloat16).eval()
    batch = args.batch_130m
    engine = build_engine(args.small, 1, VOCAB, "fbi", batch, args.seq_len, "bf16")
    tokens = torch.randint(0, VOCAB, (batch, args.seq_len + 1), device=DEVICE)

    def online():
        with torch.no_grad():
            return teacher(tokens[:, :-1]).logits

    with torch.no_grad():
        ids, logp, tail = encode_topk(online(), 64, 1.0)
    cached = SparseTargets(ids, logp.exp(), tail.exp())
    t_online = timed(lm_step(engine, tokens, online), args.steps, sync)
    t_cache = timed(lm_step(engine, tokens, lambda: cached), args.steps, sync)
    n = batch * args.seq_len
    row("distillation step, online vs cache", "PASS",
        f"online teacher {n / t_online:,.0f} tok/s, top-64 cache {n / t_cache:,.0f} tok/s "
        f"(x{t_online / t_cache:.2f} faster from the cache)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-130m", type=int, default=8)
    parser.add_argument("--batch-1p3b", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--small", default="fbi_130m", help="conf/model of the 130M rows")
    parser.add_argument("--large", default="fbi_1p3b", help="conf/model of the 1.3B row")
    parser.add_argument("--only", default="tests,mamba,packed,130m,1p3b,sign,distill")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}); it measures GPU-only paths and needs one GPU. Nothing "
              "was measured.", file=sys.stderr)
        return 2
    started = time.monotonic()
    checks = {"tests": check_cuda_tests, "mamba": check_mamba, "packed": check_packed_kernels,
              "130m": check_130m, "1p3b": check_1p3b, "sign": check_sign_route,
              "distill": check_distillation}
    try:
        for name in args.only.split(","):
            try:
                checks[name](args)
            except Exception as err:  # one failed check must not hide the others' figures
                row(name, "ERROR", f"{type(err).__name__}: {str(err).splitlines()[0][:150]}")
                torch.cuda.empty_cache()
    except KeyboardInterrupt:  # gpu_check.sh's time limit: the table of what finished
        row("(time limit)", "STOP", f"after {time.monotonic() - started:.0f} s")
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"\n{device}, torch {torch.__version__} (CUDA {torch.version.cuda}), seq "
          f"{args.seq_len}, median of {args.steps} steps, {time.monotonic() - started:.0f} s")
    width = max(len(c) for c, _, _ in ROWS)
    for check, verdict, figures in ROWS:
        print(f"{check:<{width}}  {verdict:<5}  {figures}")
    return 0 if all(v in ("PASS", "SKIP") for _, v, _ in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
