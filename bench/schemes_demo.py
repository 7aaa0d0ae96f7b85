"""Every scheme on the demo setup, trained the same number of steps on the same targets.

    python bench/schemes_demo.py [--steps 100] [--schemes fp,fbi,...] [--out DIR]

The demo's student (fbi_tiny), corpus (Shakespeare + Milton), batch (4 x 128 tokens), schedule
and seed, one fresh student per scheme. The teacher (SmolLM2-135M) is the same for all: its
targets are written once into a sampled logit cache (32 draws per token, the unbiased target
of ``bench/teacher_sources.py``) for the samples the runs consume, so the teacher's forward
pass is paid once rather than once per scheme. Prints per scheme: bits per weight of its
binarized layers (what ``pack()`` stores, scales included) and the student's validation
perplexity on the held-out play. Step times are not compared here (the runs follow one
another); ``bench/binary_vs_fp.py`` measures them side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from binary_vs_fp import bits  # noqa: E402  (a sibling script: bench/ is sys.path[0])
from fbi.binarize import SCHEMES  # noqa: E402
from fbi.configure import compose  # noqa: E402
from fbi.deepspeed_setup import init_distributed  # noqa: E402
from fbi.distill.cache_writer import write_cache  # noqa: E402
from fbi.loop import evaluate, train_step  # noqa: E402
from fbi.run import build_run  # noqa: E402
from teacher_sources import micro_batches  # noqa: E402

TARGETS = ["teacher=cache", "teacher.cache.mode=sampled", "teacher.cache.draws=32"]


def config(out: Path, scheme: str, steps: int):
    return compose(["experiment=demo", f"scheme={scheme}", f"run_dir={out / scheme}",
                    f"max_steps={steps}", f"checkpoint_every={10 * steps}", "resume=false",
                    *TARGETS])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_schemes_demo")
    args = parser.parse_args()
    schemes = ["fp"] + [s for s in args.schemes.split(",") if s != "fp"]
    dist_info = init_distributed()
    out = args.out.resolve()

    cfg = config(out, "fp", args.steps)
    parts = math.ceil((args.steps + 1) * cfg.global_batch_size / cfg.teacher.cache.part_samples)
    start = time.perf_counter()
    write_cache(dataclasses.replace(cfg, teacher=dataclasses.replace(
        cfg.teacher, cache=dataclasses.replace(cfg.teacher.cache, max_parts=parts))), dist_info)
    print(f"sampled cache: {parts} parts in {time.perf_counter() - start:.0f} s", flush=True)

    results = {}
    for scheme in schemes:
        run = build_run(config(out, scheme, args.steps), dist_info)
        for step in range(args.steps):
            train_step(run, micro_batches(run, step))
        results[scheme] = {"bits_per_weight": bits(run.engine.module), **evaluate(run)}
        print(scheme, results[scheme], flush=True)
        del run
    print(f"\nfbi_tiny on the demo corpus, {args.steps} steps x 4 x 128 tokens, SmolLM2-135M "
          "targets (sampled, 32 draws)")
    print(f"{'scheme':<12}{'bits/weight':>12}{'val. ppl':>10}{'vs fp':>7}")
    for scheme, r in results.items():
        ppl = r["val_ppl_student"]
        print(f"{scheme:<12}{r['bits_per_weight']:>12.3f}{ppl:>10.1f}"
              f"{ppl / results['fp']['val_ppl_student']:>7.2f}")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
