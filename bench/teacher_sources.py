"""Teacher sources side by side on the demo setup (SmolLM2-135M teacher, fbi_tiny student,
Shakespeare + Milton, 4 x 128 tokens per step).

    python bench/teacher_sources.py [--steps 100] [--timing-rounds 8] [--out DIR]

1. Writes top-k (k=32) and sampled (32 draws) caches for the samples the runs consume
   (``teacher.cache.max_parts``; the layout is allocated for the whole split, so bytes/token
   are exact), and lays out a k=64 cache to measure its bytes/token.
2. KL(teacher || top-k truncation) on validation batches, with the tail mass spread
   uniformly over the other ids (what the cache keeps), and the mean tail mass.
3. Student step time with no teacher (CE only), from the caches and with the online
   teacher: one engine, the four sources alternating step by step.
4. Validation perplexity after equal steps: a fresh student per source (same seed, same
   samples), trained with online, top-k and sampled targets, and with CE only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbi.configure import compose  # noqa: E402
from fbi.data.sampler import GlobalSampler  # noqa: E402
from fbi.deepspeed_setup import init_distributed  # noqa: E402
from fbi.distill.cache import cache_dir, load_manifest  # noqa: E402
from fbi.distill.cache_files import file_names  # noqa: E402
from fbi.distill.cache_writer import write_cache  # noqa: E402
from fbi.data.prepare import ensure_shards  # noqa: E402
from fbi.distill.teacher import NoTeacher, build_teacher  # noqa: E402
from fbi.loop import evaluate, train_step  # noqa: E402
from fbi.run import build_run  # noqa: E402

SOURCES = {
    "ce": [],  # the online run's setup (same tokenizer and vocabulary), teacher replaced by none
    "online": [],
    "topk32": ["teacher=cache", "teacher.cache.k=32", "teacher.cache.value_dtype=float16",
               "teacher.cache.tail=lumped"],
    "sampled32": ["teacher=cache", "teacher.cache.mode=sampled", "teacher.cache.draws=32"],
}


def config(out: Path, name: str, steps: int, extra: list[str]):
    return compose(["experiment=demo", f"run_dir={out / name}", f"max_steps={steps}",
                    f"checkpoint_every={10 * steps}", "resume=false", *extra])


def micro_batches(run, step):
    sampler = GlobalSampler(run.train_data.num_samples, run.cfg.seed)
    return [sampler.micro_batch_ids(step * run.cfg.global_batch_size, run.cfg.micro_batch_size,
                                    a, run.dist.rank, run.dist.world_size)
            for a in range(run.grad_accum)]


def shards_of(cfg) -> Path:
    from fbi.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(Path(cfg.teacher.path).expanduser()))
    return ensure_shards(cfg.data, tokenizer, Path(cfg.cache_dir).expanduser().resolve())


def write_caches(out, steps, dist_info) -> dict[str, float]:
    bytes_per_token = {}
    for name, extra in [("topk32", SOURCES["topk32"]), ("sampled32", SOURCES["sampled32"]),
                        ("topk64", SOURCES["topk32"] + ["teacher.cache.k=64"])]:
        cfg = config(out, name, steps, extra)
        parts = 0 if name == "topk64" else math.ceil(
            (steps + 1) * cfg.global_batch_size / cfg.teacher.cache.part_samples)
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(
            cfg.teacher, cache=dataclasses.replace(cfg.teacher.cache, max_parts=parts)))
        start = time.perf_counter()
        write_cache(cfg, dist_info)
        directory = cache_dir(cfg, shards_of(cfg), Path(cfg.teacher.path).expanduser())
        m = load_manifest(directory)
        size = sum((directory / f).stat().st_size for f in file_names(m))
        bytes_per_token[name] = size / (m["num_samples"] * m["seq_len"])
        print(f"cache {name}: {parts} parts in {time.perf_counter() - start:.0f} s, "
              f"{bytes_per_token[name]:.1f} bytes/token ({directory})", flush=True)
    return bytes_per_token


@torch.no_grad()
def topk_kl(run, ks=(32, 64), batches=8) -> dict[int, tuple[float, float]]:
    """k -> (mean KL(p || top-k + uniform tail) in nats/token, mean tail mass)."""
    sums = {k: [0.0, 0.0] for k in ks}
    n = 0
    for j in range(batches):
        ids = range(j * run.cfg.micro_batch_size, (j + 1) * run.cfg.micro_batch_size)
        batch = torch.from_numpy(run.val_data.batch(ids))
        logp = torch.log_softmax(run.teacher.logits(batch[:, :-1]).double(), -1)
        V = logp.shape[-1]
        for k in ks:
            top, idx = logp.topk(k, -1)
            listed = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, idx, True)
            tail = (1 - top.exp().sum(-1)).clamp(min=1e-300)
            q_rest = (tail / (V - k)).log().unsqueeze(-1)  # uniform over the unlisted ids
            kl = torch.where(listed, 0.0, logp.exp() * (logp - q_rest)).sum(-1)
            sums[k][0] += kl.sum().item()
            sums[k][1] += tail.sum().item()
        n += logp.shape[0] * logp.shape[1]
    return {k: (s[0] / n, s[1] / n) for k, s in sums.items()}


def step_times(run, sources, rounds) -> dict[str, float]:
    times = {k: [] for k in sources}
    for r in range(rounds + 1):
        for name, source in sources.items():
            run.teacher = source
            start = time.perf_counter()
            train_step(run, micro_batches(run, r))
            if r:  # the first round warms allocators and page cache
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--timing-rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_teacher_sources")
    args = parser.parse_args()
    dist_info = init_distributed()
    out = args.out.resolve()
    bpt = write_caches(out, args.steps, dist_info)
    results: dict = {"bytes_per_token": bpt}

    online = build_run(config(out, "online", args.steps, []), dist_info)
    results["kl_topk"] = {k: {"kl_nats": v[0], "tail_mass": v[1]}
                          for k, v in topk_kl(online).items()}
    print("KL(teacher || top-k + uniform tail):", results["kl_topk"], flush=True)
    sources = {"ce": NoTeacher()}
    for name in ("topk32", "sampled32"):
        cfg = config(out, name, args.steps, SOURCES[name])
        sources[name] = build_teacher(cfg, Path(cfg.teacher.path).expanduser(), online.device,
                                      shards_of(cfg), online.train_data, online.tokenizer)
    sources["online"] = online.teacher
    ms = step_times(online, sources, args.timing_rounds)
    results["step_s"] = ms
    print("step time (s, median):", {k: round(v, 3) for k, v in ms.items()},
          "ratio to CE:", {k: round(v / ms["ce"], 2) for k, v in ms.items()}, flush=True)
    del online

    results["val_ppl"] = {}
    for name, extra in SOURCES.items():
        run = build_run(config(out, f"ppl_{name}", args.steps, extra), dist_info)
        if name == "ce":
            run.teacher = NoTeacher()
        start = time.perf_counter()
        for step in range(args.steps):
            train_step(run, micro_batches(run, step))
        ev = evaluate(run)
        ev["train_s"] = time.perf_counter() - start
        results["val_ppl"][name] = ev
        print(f"{name}: after {args.steps} steps {ev}", flush=True)
        del run
    ref = results["val_ppl"]["online"]["val_ppl_student"]
    print("val ppl ratio to online:", {k: round(v["val_ppl_student"] / ref, 3)
                                       for k, v in results["val_ppl"].items()})
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
