"""The rows of the GPU acceptance check (bench/gpu_check.py runs each in its own process).

Each row returns ``(verdict, figures, data)``. A row compares something against a criterion
that can fail; on ``--device cpu`` it runs the same code on CPU with tiny models, and where its
claim is about CUDA (GPU = CPU, peak memory, throughput, kernels, several GPUs) it reports SKIP
with the reason once its comparison held, FAIL when it did not. ``FBI_GPU_CHECK_FAULT=<row>``
perturbs that row's candidate figure by ``FBI_GPU_CHECK_FAULT_SCALE`` (1e-3) relative before
its comparison: the check of the check (tests/test_gpu_check.py); rows with loose criteria
(peak memory 15%, throughput, the preemption's seconds) need a larger scale to fail.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 32000  # LLaMA-2's tokenizer, as the FBI-LLM recipes
TORCH_RANGE = ((2, 11), (2, 13))  # the torch releases the project runs on


@dataclass
class Ctx:
    """What every row is handed: the device, the fixtures' folder, and the sizes."""

    device: str  # cuda | cpu
    work: Path  # tokenizer/, corpus/, teacher/, cache/ (gpu_check.py's fixtures)
    row: str
    seq_len: int = 2048
    steps: int = 5

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def perturb(self, value):
        """The candidate of this row's comparison, perturbed when the fault injection names it."""
        if os.environ.get("FBI_GPU_CHECK_FAULT") == self.row:
            return value * (1 + float(os.environ.get("FBI_GPU_CHECK_FAULT_SCALE", "1e-3")))
        return value


def verdict(ok: bool, cuda_claim: bool, ctx: Ctx) -> str:
    """FAIL when the comparison failed; SKIP when it held but the claim is about CUDA and
    this is the CPU; else PASS."""
    if not ok:
        return "FAIL"
    return "SKIP" if cuda_claim and not ctx.cuda else "PASS"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def compose(*overrides: str):
    from fbi.configure import compose as fbi_compose

    return fbi_compose(["experiment=none", "max_steps=10", *overrides])


# --- environment --------------------------------------------------------------------------

def version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def deepspeed_ops() -> dict[str, str]:
    """DeepSpeed's ops this check uses: prebuilt, JIT-buildable here, or neither."""
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder
    from deepspeed.git_version_info import installed_ops

    ops = {}
    for builder in (CPUAdamBuilder(), FusedAdamBuilder()):
        if installed_ops.get(builder.NAME):
            ops[builder.NAME] = "prebuilt"
        else:
            ops[builder.NAME] = "JIT" if builder.is_compatible(verbose=False) else "unavailable"
    return ops


def row_environment(ctx: Ctx):
    major_minor = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    data = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}
    missing = [m for m in ("deepspeed", "hydra", "omegaconf", "transformers", "sentencepiece",
                           "tokenizers", "safetensors") if version_of(m) is None]
    data.update({m: version_of(m) for m in ("deepspeed", "hydra", "omegaconf", "transformers",
                                            "triton", "mamba_ssm")})
    problems = [f"missing {', '.join(missing)}"] if missing else []
    if not TORCH_RANGE[0] <= major_minor <= TORCH_RANGE[1]:
        problems.append(f"torch {torch.__version__} outside the supported 2.11-2.13")
    if "deepspeed" not in missing:
        data["deepspeed_ops"] = deepspeed_ops()
    if ctx.cuda:
        if not torch.cuda.is_available():
            problems.append("torch.cuda.is_available() is False")
        else:
            data.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                        capability=".".join(map(str, torch.cuda.get_device_capability())),
                        bf16=torch.cuda.is_bf16_supported(),
                        nccl=".".join(map(str, torch.cuda.nccl.version())),
                        driver=driver_version())
            if not data["bf16"]:
                problems.append("no bf16 on this GPU (the recipes train in bf16)")
            if data.get("deepspeed_ops", {}).get("fused_adam") == "unavailable":
                problems.append("DeepSpeed's fused_adam can neither load nor build")
    ok = not problems
    figures = "; ".join(problems) if problems else ", ".join(
        f"{k} {v}" for k, v in data.items() if v is not None and k != "deepspeed_ops")
    if "deepspeed_ops" in data:
        figures += "; ops " + ", ".join(f"{k} {v}" for k, v in data["deepspeed_ops"].items())
    return verdict(ok, False, ctx), figures, data


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


# --- GPU = CPU ----------------------------------------------------------------------------

def loss_and_grads(model, tokens):
    model.zero_grad()
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def step_difference(ctx: Ctx, scheme: str, vocab: int = 512):
    """(loss rel. diff, largest gradient rel. diff) of one fp32 forward/backward of ``scheme``
    on the device against the same model on the CPU (in float64 when the device is the CPU:
    something that can differ)."""
    from fbi.models import build_model

    cfg = compose(*tiny(ctx), f"model.vocab_size={vocab}", f"scheme={scheme}")
    torch.manual_seed(0)
    reference = build_model(cfg.model, cfg.scheme)
    candidate = build_model(cfg.model, cfg.scheme)
    candidate.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, vocab, (2, 65), generator=torch.Generator().manual_seed(1))
    if not ctx.cuda:
        reference = reference.double()
    ref_loss, ref_grads = loss_and_grads(reference, tokens)
    loss, grads = loss_and_grads(candidate.to(ctx.device), tokens.to(ctx.device))
    loss = ctx.perturb(loss)
    grad_diff = max(rel(grads[n], ref_grads[n]) for n in ref_grads)
    return rel(loss, ref_loss), grad_diff


def row_gpu_equals_cpu(ctx: Ctx):
    from fbi.binarize import SCHEMES

    # Schemes that quantize activations (the BitNets' absmax int8, FBI W1A1's sign): an
    # activation at a rounding boundary lands on the other side when the summation order
    # changes, and the straight-through gradient follows it. Their losses are compared
    # (1e-2), their gradients not.
    activation_quantizers = [name for name, cls in SCHEMES.items() if cls.QUANTIZES_ACTIVATIONS]
    no_tf32()
    loss_diff, grad_diff = step_difference(ctx, "fbi")
    ok = loss_diff <= 1e-5 and grad_diff <= 1e-5
    worst, bad = {}, {}
    for scheme in SCHEMES:
        loss, grads = step_difference(ctx, scheme)
        if scheme in activation_quantizers:
            worst[scheme] = loss
            if loss > 1e-2:
                bad[scheme] = loss
        else:  # weight-only quantizers: the forward's matmuls see the same weights
            worst[scheme] = max(loss, grads)
            if worst[scheme] > 1e-4:
                bad[scheme] = worst[scheme]
    ok = ok and not bad
    against = "cpu fp32" if ctx.cuda else "cpu float64 (no GPU: the fp32 step vs float64)"
    figures = (f"fbi_tiny fbi vs {against}: loss {loss_diff:.1e}, grads {grad_diff:.1e} (<=1e-5); "
               f"weight-only schemes' loss and grads <=1e-4, {'/'.join(activation_quantizers)} "
               f"loss <=1e-2: " + ", ".join(f"{k} {v:.0e}" for k, v in worst.items()))
    return verdict(ok, True, ctx), figures, {"fbi": [loss_diff, grad_diff], "schemes": worst}


# --- ZeRO stages against plain AdamW ---------------------------------------------------

ZERO_STEPS = 3


def tiny(ctx: Ctx) -> list[str]:
    """fbi_tiny on a GPU; on CPU narrower (the machine that runs the suite is small)."""
    if ctx.cuda:
        return ["model=fbi_tiny"]
    return ["model=fbi_tiny", "model.n_layers=2", "model.d_model=64", "model.d_ff=128",
            "model.n_heads=4", "model.n_kv_heads=2"]


def zero_overrides(ctx: Ctx, vocab: int) -> list[str]:
    return [*tiny(ctx), f"model.vocab_size={vocab}", "scheme=fbi", "precision=fp32",
            "max_steps=10", "global_batch_size=2", "micro_batch_size=2", "data.seq_len=64",
            "optim.warmup_steps=2", "optim.lr=3e-3", "zero.param_persistence_threshold=0"]


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """The engine's parameters, gathered whole under ZeRO-3."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().float().cpu().clone() for n, p in params.items()}


def plain_adamw(cfg, state: dict, tokens: torch.Tensor, device: str):
    """The reference: the same model under torch.optim.AdamW with the schedule, groups and
    clipping train.py's DeepSpeed config states, on the device, fp32."""
    from fbi.deepspeed_setup import lr_lambda, param_groups
    from fbi.models import build_model

    model = build_model(cfg.model, cfg.scheme).to(device)
    model.load_state_dict(state)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay, o.decay), lr=o.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    losses = []
    for _ in range(ZERO_STEPS):
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, {n: p.detach().cpu() for n, p in model.named_parameters()}


def row_zero_stages(ctx: Ctx):
    from fbi.deepspeed_setup import build_context, deepspeed_config, init_distributed, initialize
    from fbi.models import build_model

    no_tf32()
    vocab = 512
    init_distributed()
    tokens = torch.randint(0, vocab, (2, 65), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(ctx.device)
    base = compose(*zero_overrides(ctx, vocab))
    torch.manual_seed(0)
    state = build_model(base.model, base.scheme).state_dict()
    ref_losses, ref_params = plain_adamw(base, state, tokens, ctx.device)
    results = {}
    for zero in ("stage0", "stage1", "stage2", "stage3", "stage3_offload"):
        cfg = compose(*zero_overrides(ctx, vocab), f"zero={zero}")
        ds_config = deepspeed_config(cfg, 1)
        with build_context(cfg, ds_config):
            model = build_model(cfg.model, cfg.scheme)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            model.load_state_dict(state)
        engine = initialize(model, cfg, ds_config)
        losses = []
        for _ in range(ZERO_STEPS):
            logits = engine(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                     tokens[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        params = full_parameters(engine)
        loss_diff = max(abs(ctx.perturb(a) - b) / abs(b) for a, b in zip(losses, ref_losses))
        param_diff = {n: rel(params[n], ref_params[n]) for n in ref_params}
        worst = max(param_diff, key=param_diff.get)
        results[zero] = (loss_diff, param_diff[worst], worst)
        del engine
    # Adam's update is about lr * sign(grad) where the gradient is tiny: a rounding difference
    # there moves an element by a whole step, hence 1e-3 on the parameters, 1e-5 on losses.
    bad = {z: d for z, d in results.items() if d[0] > 1e-5 or d[1] > 1e-3}
    figures = (f"{ZERO_STEPS} fp32 steps vs torch AdamW (losses <=1e-5, parameters <=1e-3): "
               + ", ".join(f"{z} {l:.0e}/{p:.0e} ({n})" for z, (l, p, n) in results.items()))
    if not ctx.cuda:
        figures += " (on CPU DeepSpeed uses torch's Adam, not CPUAdam)"
    return verdict(not bad, False, ctx), figures, {"results": results}


# --- train.py runs: save/kill/resume, preemption, the 1-bit route, several GPUs ----------

def train_args(ctx: Ctx, run_dir: Path, steps: int) -> list[str]:
    w = ctx.work
    return [f"run_dir={run_dir}", f"cache_dir={w / 'cache'}", "teacher=none",
            f"tokenizer.path={w / 'tokenizer'}", "data=files", f"data.files=[{w / 'corpus'}/*.txt]",
            "data.seq_len=32", "data.val_fraction=0.05", "model=fbi_tiny", "model.n_layers=2",
            "model.d_model=64", "model.d_ff=128", "model.n_heads=4", "model.n_kv_heads=2",
            "global_batch_size=4", "micro_batch_size=2", "logging.log_every=1",
            "eval_batches=0", "optim.lr=3e-3", "optim.warmup_steps=2", f"max_steps={steps}",
            "precision=fp32", f"distributed.device={ctx.device}"]


def start_train(overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "train.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), str(REPO / "train.py")]
    return subprocess.Popen(cmd + overrides, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, what: str) -> str:
    _, err = proc.communicate()
    if proc.returncode != 0:
        errors = [line for line in err.splitlines() if " ERROR " in line or "Error:" in line]
        raise RuntimeError(f"{what}: train.py exited {proc.returncode}: "
                           f"{(errors or err.splitlines()[-1:] or [''])[0][:400]}")
    return err


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and not r.get("replayed")}


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    while max(losses(run_dir), default=0) < step:
        if proc.poll() is not None:
            raise RuntimeError(f"train.py ended ({proc.returncode}) before step {step}: "
                               f"{proc.communicate()[1][-2000:]}")
        time.sleep(0.05)


def row_resume(ctx: Ctx):
    steps, out = 6, ctx.work / "resume"
    reference = losses_of_run(ctx, out / "reference", steps)
    faulty = out / "faulty"
    proc = start_train(train_args(ctx, faulty, steps) + ["checkpoint_every=2"])
    wait_for_step(proc, faulty, 4)
    proc.kill()  # SIGKILL: no handler runs, the step-4 (or step-2) checkpoint is what is left
    proc.wait()
    killed_at = max(losses(faulty))
    finish(start_train(train_args(ctx, faulty, steps)), "the resumed run")
    resumed = losses(faulty)
    diff = [ctx.perturb(resumed.get(s, math.nan)) != reference[s] for s in reference]
    ok = sorted(resumed) == sorted(reference) and not any(diff)
    figures = (f"killed after step {killed_at} of {steps}, resumed: losses "
               f"{'bitwise equal to' if ok else 'DIFFER from'} the uninterrupted run's")
    return verdict(ok, False, ctx), figures, {"reference": reference, "resumed": resumed}


def losses_of_run(ctx: Ctx, run_dir: Path, steps: int, nproc: int = 1,
                  *extra: str) -> dict[int, float]:
    finish(start_train(train_args(ctx, run_dir, steps) + list(extra), nproc), str(run_dir.name))
    return losses(run_dir)


def row_preemption(ctx: Ctx):
    run_dir = ctx.work / "preemption"
    proc = start_train(train_args(ctx, run_dir, 1000) + ["checkpoint_every=1000"])
    wait_for_step(proc, run_dir, 2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate()
    seconds = ctx.perturb(time.monotonic() - sent)
    grace = [int(g) for g in re.findall(r"need about (\d+) s after a signal", err)]
    stopped = max(losses(run_dir))
    saved = (run_dir / "checkpoints" / f"step_{stopped:08d}").is_dir()
    ok = (proc.returncode == 0 and saved and bool(grace) and seconds <= grace[-1]
          and "stopped after step" in err)
    figures = (f"SIGUSR1 at step {stopped}: exit {proc.returncode}, checkpoint "
               f"{'written' if saved else 'MISSING'}, {seconds:.1f} s "
               f"(logged grace {grace[-1] if grace else 'NOT LOGGED'} s)")
    return verdict(ok, False, ctx), figures, {"seconds": seconds, "grace": grace}


def ranks(ctx: Ctx) -> int:
    return torch.cuda.device_count() if ctx.cuda else 2


def row_sign_route(ctx: Ctx):
    n, steps = ranks(ctx), 4
    # weights (4096 elements and more) partitioned, scales (64) whole, as the route needs
    zero = ["zero=stage3", "zero.param_persistence_threshold=1000"]
    plain = losses_of_run(ctx, ctx.work / "plain_route", steps, n, *zero)
    signs = losses_of_run(ctx, ctx.work / "sign_route", steps, n, *zero, "zero.gather_signs=true")
    equal = len(plain) == steps and all(ctx.perturb(signs[s]) == plain[s] for s in plain)
    figures = (f"ZeRO-3 on {n} rank(s) ({'NCCL' if ctx.cuda else 'gloo'}), {steps} steps: losses "
               f"{'bitwise equal' if equal else 'DIFFER'} (zero.gather_signs vs the plain gather)")
    return verdict(equal, False, ctx), figures, {"plain": plain, "signs": signs}


def collectives_worker(rank: int, world: int, port: int, backend: str, out: Path) -> None:
    """all_reduce, all_gather, reduce_scatter of known values on each rank."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    gathered = [torch.empty(4, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.full((4,), float(rank), device=device))
    scattered = torch.empty(4, device=device)
    dist.reduce_scatter_tensor(scattered, torch.arange(4 * world, dtype=torch.float32,
                                                       device=device))
    ok = (x == world * (world + 1) / 2).all().item() \
        and all((g == r).all().item() for r, g in enumerate(gathered)) \
        and torch.equal(scattered.cpu(), world * torch.arange(4 * rank, 4 * rank + 4,
                                                              dtype=torch.float32))
    (out / f"rank{rank}").write_text("ok" if ok else "wrong")
    dist.destroy_process_group()


def row_multi_gpu(ctx: Ctx):
    from fbi.distributed import free_port

    n = ranks(ctx)
    if ctx.cuda and n < 2:
        return "SKIP", f"one GPU on this node ({n}): no NCCL collectives to check", {}
    backend = "nccl" if ctx.cuda else "gloo"
    out = ctx.work / "collectives"
    out.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(collectives_worker, (n, free_port(), backend, out), nprocs=n)
    collectives_ok = all((out / f"rank{r}").read_text() == "ok" for r in range(n))
    figures = f"{backend} all_reduce/all_gather/reduce_scatter on {n} ranks: " \
              f"{'exact' if collectives_ok else 'WRONG'}"
    if not ctx.cuda:
        return (verdict(collectives_ok, True, ctx), f"no CUDA device: {figures} (the ZeRO-3 "
                "step across ranks on CPU is the 1-bit route row's)", {})
    one = losses_of_run(ctx, ctx.work / "zero3_one", 3, 1, "zero=stage3")
    many = losses_of_run(ctx, ctx.work / "zero3_many", 3, n, "zero=stage3")
    diff = max(abs(ctx.perturb(many[s]) - one[s]) / abs(one[s]) for s in one)
    ok = collectives_ok and diff <= 1e-4
    return verdict(ok, True, ctx), figures + f"; ZeRO-3 on {n} GPUs vs 1: losses {diff:.1e} " \
        "(<=1e-4)", {"one": one, "many": many}


# --- distillation ------------------------------------------------------------------------

def row_distillation(ctx: Ctx):
    """An online-teacher step, a teacher-free step and a cache step of the same student on the
    same batch: each loss against a float64 formula (KL(teacher || student) per token, or CE),
    the cache's top-V targets against the dense teacher, and their step times."""
    from transformers import AutoModelForCausalLM

    from fbi.distill.cache_writer import encode_topk
    from fbi.distill.loss import distillation_loss
    from fbi.distill.targets import SparseTargets
    from fbi.models import build_model

    no_tf32()
    teacher = AutoModelForCausalLM.from_pretrained(ctx.work / "teacher").to(ctx.device).eval()
    vocab = teacher.config.vocab_size
    cfg = compose(*tiny(ctx), f"model.vocab_size={vocab}", "scheme=fbi")
    torch.manual_seed(0)
    student = build_model(cfg.model, cfg.scheme).to(ctx.device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab, (4, 129), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(ctx.device)
    with torch.no_grad():
        t_logits = teacher(tokens[:, :-1]).logits.float()
        ids, logp, tail = encode_topk(t_logits, vocab, 1.0)
    cached = SparseTargets(ids, logp.exp(), tail.exp())
    s_logits = student(tokens[:, :-1]).detach().double()
    s_logp = s_logits.log_softmax(-1)
    t_p = t_logits.double().softmax(-1)
    soft_ce = -(t_p * s_logp).sum(-1).mean().item()  # FBI-LLM's loss (fbi.distill.loss)
    ce = torch.nn.functional.nll_loss(s_logp.flatten(0, 1), tokens[:, 1:].flatten()).item()
    sources = {"online": lambda: teacher(tokens[:, :-1]).logits, "teacher-free": lambda: None,
               "cache": lambda: cached}

    def step(targets):
        with torch.no_grad():
            t = targets()
        out = distillation_loss(student(tokens[:, :-1]), t, tokens[:, 1:])
        out.loss.backward()
        return out.loss.item()

    found = {name: step(targets) for name, targets in sources.items()}  # the initial weights
    found["online"] = ctx.perturb(found["online"])
    times = {}
    for name, targets in sources.items():
        sync(ctx)
        start = time.perf_counter()
        for _ in range(ctx.steps):
            opt.zero_grad()
            step(targets)
            opt.step()
        sync(ctx)
        times[name] = (time.perf_counter() - start) / ctx.steps
    diffs = {"online": abs(found["online"] - soft_ce) / soft_ce,
             "teacher-free": abs(found["teacher-free"] - ce) / ce,
             "cache": abs(found["cache"] - found["online"]) / found["online"]}
    ok = all(d <= 1e-5 for d in diffs.values())
    figures = ("losses vs float64 (soft CE, CE) and top-V cache vs online <=1e-5: "
               + ", ".join(f"{k} {v:.0e}" for k, v in diffs.items()) + "; step "
               + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in times.items()))
    return verdict(ok, False, ctx), figures, {"losses": found, "diffs": diffs, "step_s": times}


# --- Bi-Mamba ----------------------------------------------------------------------------

def row_bimamba(ctx: Ctx):
    from fbi.models import build_model
    from fbi.models.ssd import chunked_scan, mamba_ssm_kernel, mamba_ssm_scan, sequential_scan

    no_tf32()
    g = torch.Generator().manual_seed(0)
    b, length, heads, hd, state = 2, 256 if not ctx.cuda else ctx.seq_len, 8, 32, 64
    x = torch.randn(b, length, heads, hd, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, length, heads, generator=g))
    A = -torch.rand(heads, generator=g) - 0.5
    Bm, Cm = (torch.randn(b, length, 1, state, generator=g) for _ in range(2))
    D = torch.randn(heads, generator=g)
    inputs = [t.to(ctx.device) for t in (x, dt, A, Bm, Cm, D)]
    chunked = ctx.perturb(chunked_scan(*inputs, chunk_size=64))
    ref = sequential_scan(*[t.double().cpu() for t in inputs])
    scan_diff = rel(chunked, ref)
    kernel = mamba_ssm_kernel() is not None and ctx.cuda
    kernel_diff = rel(mamba_ssm_scan(*inputs, chunk_size=64), chunked) if kernel else None
    step_losses = {}
    for impl in (["torch", "mamba_ssm"] if kernel else ["torch"]):
        cfg = compose("model=bimamba_tiny", "model.vocab_size=512", "scheme=fbi",
                      f"model.scan={impl}")
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.scheme).to(ctx.device)
        tokens = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(1))
        loss, grads = loss_and_grads(model, tokens.to(ctx.device))
        step_losses[impl] = (loss.item(), all(torch.isfinite(v).all() for v in grads.values()))
    finite = all(math.isfinite(loss) and fin for loss, fin in step_losses.values())
    step_diff = (abs(step_losses["mamba_ssm"][0] - step_losses["torch"][0]) / step_losses["torch"][0]
                 if kernel else None)
    ok = (finite and scan_diff <= 1e-5 and (kernel_diff is None or kernel_diff <= 1e-3)
          and (step_diff is None or step_diff <= 1e-3))
    figures = (f"chunked scan vs sequential float64 {scan_diff:.1e} (<=1e-5); bimamba_tiny "
               f"step with the torch scan: loss {step_losses['torch'][0]:.3f}")
    if kernel:
        figures += f"; mamba-ssm kernel vs scan {kernel_diff:.1e}, step losses {step_diff:.1e} (<=1e-3)"
        return verdict(ok, False, ctx), figures, {"step": step_losses}
    if ok:
        why = "mamba-ssm not installed" if ctx.cuda else "no CUDA device"
        return "SKIP", f"{why}: no kernel to compare; {figures}", {"step": step_losses}
    return "FAIL", figures, {"step": step_losses}


# --- peak memory and throughput (fbi_130m, fbi_1p3b on a GPU; fbi_tiny on CPU) -------------

def recipe_models(ctx: Ctx) -> list[tuple[str, int, int]]:
    """(model, micro-batch, sequence length) of the measured steps."""
    if ctx.cuda:
        return [("fbi_130m", 8, ctx.seq_len), ("fbi_1p3b", 4, ctx.seq_len)]
    return [("fbi_tiny", 2, 64)]


def recipe_overrides(ctx: Ctx, model: str, batch: int, seq_len: int, scheme: str,
                     precision: str):
    shape = [f"model={model}", f"model.vocab_size={VOCAB}"] if ctx.cuda else \
        [*tiny(ctx), "model.vocab_size=512"]
    return [*shape, f"scheme={scheme}", "teacher=none", "zero=stage1",
            f"precision={precision}", "max_steps=10", f"global_batch_size={batch}",
            f"micro_batch_size={batch}", f"data.seq_len={seq_len}", "optim.warmup_steps=1",
            *(["zero.activation_checkpointing=true"] if model == "fbi_1p3b" else [])]


def engine_and_step(ctx: Ctx, overrides: list[str]):
    from fbi.deepspeed_setup import build_context, deepspeed_config, init_distributed, initialize
    from fbi.distill.loss import distillation_loss
    from fbi.models import build_model

    if not torch.distributed.is_initialized():
        init_distributed()
    cfg = compose(*overrides)
    ds_config = deepspeed_config(cfg, 1)
    with build_context(cfg, ds_config):
        model = build_model(cfg.model, cfg.scheme)
    engine = initialize(model, cfg, ds_config)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.micro_batch_size, cfg.data.seq_len + 1),
                           device=ctx.device)

    def step():
        loss = distillation_loss(engine(tokens[:, :-1]), None, tokens[:, 1:]).loss
        engine.backward(loss)
        engine.step()

    return cfg, engine, step


def timed(ctx: Ctx, step) -> float:
    step()
    step()
    times = []
    for _ in range(ctx.steps):
        sync(ctx)
        start = time.perf_counter()
        step()
        sync(ctx)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def row_peak_memory(ctx: Ctx):
    """Peak memory of a training step against ``fbi.estimate``. One model per process: a
    process that built another engine before would report that one's peak."""
    if ctx.cuda and os.environ.get("FBI_GPU_CHECK_MODEL") is None:
        return per_model(ctx, "peak_memory")
    from fbi.estimate import estimate

    name, batch, seq_len = model_of(ctx)
    precision = "bf16" if ctx.cuda else "fp32"
    cfg, engine, step = engine_and_step(ctx, recipe_overrides(ctx, name, batch, seq_len, "fbi",
                                                              precision))
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    step()
    step()
    expected = estimate(cfg, 1).total
    if ctx.cuda:
        peak = ctx.perturb(float(torch.cuda.max_memory_allocated()))
    else:
        peak = ctx.perturb(float(sum(p.numel() * p.element_size() for p in engine.parameters())))
    ratio = peak / expected
    figures = f"{name} bf16 batch {batch}x{seq_len}: peak {peak / 2**30:.2f} GiB, estimate " \
              f"{expected / 2**30:.2f} GiB (x{ratio:.2f}, within 15%)"
    if not ctx.cuda:
        ok = math.isfinite(expected) and expected > peak > 0
        return (verdict(ok, True, ctx), f"no CUDA allocator: {name} fp32 step ran; its "
                f"parameters {peak / 2**20:.1f} MiB below the estimate {expected / 2**20:.1f} MiB", {})
    return verdict(abs(ratio - 1) <= 0.15, True, ctx), figures, {"peak": peak, "estimate": expected}


def row_throughput(ctx: Ctx):
    if ctx.cuda and os.environ.get("FBI_GPU_CHECK_MODEL") is None:
        return per_model(ctx, "throughput")
    from fbi.flops import mfu, peak_flops
    from fbi.models import architecture

    name, batch, seq_len = model_of(ctx)
    precision = "bf16" if ctx.cuda else "fp32"
    seconds = {}
    for scheme in ("fp", "fbi"):
        torch.manual_seed(0)
        cfg, engine, step = engine_and_step(ctx, recipe_overrides(ctx, name, batch, seq_len, scheme,
                                                                  precision))
        seconds[scheme] = timed(ctx, step)
        del engine, step
        if ctx.cuda:
            torch.cuda.empty_cache()
    seconds["fbi"] = ctx.perturb(seconds["fbi"])
    tokens_per_s = batch * seq_len / seconds["fbi"]
    peak = peak_flops(torch.device(ctx.device))
    util = mfu(tokens_per_s, architecture(cfg.model).flops_per_token(cfg.model, seq_len), 1,
               peak) if peak else None
    ratio = seconds["fbi"] / seconds["fp"]
    # FBI-LLM's layers add an effective-weight pass per matmul: more than twice the dense
    # step, or an MFU below 10% on a known GPU, is a regression worth stopping for. A tiny
    # CPU model's step is mostly that fixed pass, so on CPU only the times are checked.
    ok = (ratio <= 2.0 and (util is None or util >= 0.10)) if ctx.cuda else 0 < ratio < math.inf
    mfu_text = "n/a (unknown peak)" if util is None else f"{100 * util:.1f}% (>=10%)"
    figures = (("" if ctx.cuda else "no CUDA device, CPU times: ")
               + f"{name} {precision} {batch}x{seq_len}: fbi {seconds['fbi'] * 1e3:.0f} ms "
               f"({tokens_per_s:,.0f} tok/s, MFU {mfu_text}), fp {seconds['fp'] * 1e3:.0f} ms: "
               f"x{ratio:.2f} (<=2 on a GPU)")
    return verdict(ok, True, ctx), figures, {"seconds": seconds, "mfu": util}


def model_of(ctx: Ctx) -> tuple[str, int, int]:
    models = recipe_models(ctx)
    wanted = os.environ.get("FBI_GPU_CHECK_MODEL", models[0][0])
    return next(m for m in models if m[0] == wanted)


def per_model(ctx: Ctx, row: str):
    """Run ``row`` once per recipe model, each in a fresh process (peak memory is the
    process's); the worst verdict wins."""
    verdicts, figures, data = [], [], {}
    for name, _, _ in recipe_models(ctx):
        proc = subprocess.run(
            [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--row", row, "--device",
             ctx.device, "--work", str(ctx.work), "--seq-len", str(ctx.seq_len), "--steps",
             str(ctx.steps), "--result", str(ctx.work / f"{row}_{name}.json")],
            env={**os.environ, "FBI_GPU_CHECK_MODEL": name}, capture_output=True, text=True)
        result_file = ctx.work / f"{row}_{name}.json"
        if proc.returncode != 0 or not result_file.exists():
            verdicts.append("ERROR")
            figures.append(f"{name}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
            continue
        result = json.loads(result_file.read_text())
        verdicts.append(result["verdict"])
        figures.append(result["figures"])
        data[name] = result["data"]
    order = ["ERROR", "FAIL", "SKIP", "PASS"]
    return min(verdicts, key=order.index), "; ".join(figures), data


def adam_step_difference(ctx: Ctx, optimizer_cls, device: str) -> float:
    """One step of a DeepSpeed Adam against torch.optim.AdamW on the same tensor and gradient."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(4096, device=device))
    theirs = torch.nn.Parameter(ours.detach().clone())
    grad = torch.randn(4096, device=device)
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    optimizer_cls([ours], lr=1e-2, weight_decay=0.1, adamw_mode=True).step()
    torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1).step()
    return rel(ctx.perturb(ours.detach()), theirs)


def row_deepspeed_ops(ctx: Ctx):
    """DeepSpeed's compiled ops the recipes use, loaded (built first if not prebuilt: this
    row has the long time limit) and checked against torch.optim.AdamW: FusedAdam on the GPU
    (the optimizer of every GPU run), CPUAdam (stage3_offload)."""
    from fbi.deepspeed_setup import init_distributed

    init_distributed()  # on CPU this builds DeepSpeed's shm comm op the other rows need
    if not ctx.cuda:
        return ("SKIP", "no CUDA device: FusedAdam needs one, and DeepSpeed uses torch's Adam "
                "on CPU (CPUAdam only beside a GPU); the shm comm op loaded", {})
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    diffs = {}
    for name, cls, device in (("fused_adam", FusedAdam, "cuda"),
                              ("cpu_adam", DeepSpeedCPUAdam, "cpu")):
        diffs[name] = adam_step_difference(ctx, cls, device)
    ok = all(d <= 1e-6 for d in diffs.values())
    figures = "one step vs torch AdamW (<=1e-6): " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    return verdict(ok, True, ctx), figures, diffs


def row_packed_kernels(ctx: Ctx):
    """A packed FBI-Linear layer on the 1-bit kernels (Triton on CUDA, the compiled C++ kernel
    on CPU) against the float64 product of its unpacked weight, at decode (1 token) and
    prefill; on CUDA also ms against torch's dense fp32 and bf16 products."""
    from fbi.binarize import SCHEMES, scheme_config
    from fbi.kernels.linear import PackedLinear

    torch.manual_seed(0)
    shape, tokens = ((2048, 5632), (1, 512)) if ctx.cuda else ((300, 257), (1, 37))
    layer = SCHEMES["fbi"](*shape, init_std=0.02, cfg=scheme_config("fbi"))
    packed = PackedLinear(layer, layer.pack()).to(ctx.device)
    w32 = type(layer).unpack(layer.pack()).to(ctx.device)
    w16 = w32.bfloat16()

    def ms(fn) -> float:
        fn()
        sync(ctx)
        start = time.perf_counter()
        for _ in range(10 * ctx.steps):
            fn()
        sync(ctx)
        return 1e3 * (time.perf_counter() - start) / (10 * ctx.steps)

    worst, figures, data = 0.0, [], {}
    with torch.no_grad():
        for n in tokens:
            x = torch.randn(n, shape[0], device=ctx.device)
            err = rel(ctx.perturb(packed(x)), x.double() @ w32.double().T)
            worst = max(worst, err)
            xb = x.bfloat16()
            timing = {"packed_ms": ms(lambda: packed(x)), "fp32_ms": ms(lambda: x @ w32.T),
                      "bf16_ms": ms(lambda: xb @ w16.T)}
            data[f"tokens_{n}"] = {"rel_err": err, **timing}
            figures.append(f"{n} tok: err {err:.1e}, packed {timing['packed_ms']:.3f} ms, "
                           f"fp32 x{timing['fp32_ms'] / timing['packed_ms']:.1f}, "
                           f"bf16 x{timing['bf16_ms'] / timing['packed_ms']:.1f}")
    ok = worst < 1e-5
    reason = "" if ctx.cuda else "; the Triton kernel and its timings are the CUDA claim"
    return verdict(ok, True, ctx), "; ".join(figures) + reason, data


ROWS = {
    "environment": row_environment,
    "deepspeed_ops": row_deepspeed_ops,
    "gpu_equals_cpu": row_gpu_equals_cpu,
    "zero_stages": row_zero_stages,
    "resume": row_resume,
    "peak_memory": row_peak_memory,
    "throughput": row_throughput,
    "distillation": row_distillation,
    "sign_route": row_sign_route,
    "bimamba": row_bimamba,
    "preemption": row_preemption,
    "multi_gpu": row_multi_gpu,
    "packed_kernels": row_packed_kernels,
}
