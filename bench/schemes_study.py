"""Every scheme at equal tokens, like the papers' comparison tables (FBI-LLM's Table 2).

    python bench/schemes_study.py [--steps 16] [--seeds 0 1 2] [--schemes fp fbi ...] [--out DIR]
    python bench/schemes_study.py --table     # the table from the stored per-seed results

Demo setup (SmolLM2-135M teacher, fbi_tiny student, Shakespeare + Milton, 4 x 128 tokens per
step, the demo's learning-rate schedule over ``--steps``). For each seed the teacher runs once
over the samples the runs consume and its targets are kept in memory as the default cache
stores them (sampled, 12 draws: ``bench/targets_study.py``'s ``sampled12``); then every scheme,
with its defaults (the authors' forms), trains a fresh student on those same targets, the
same samples in the same order, the seed setting the initialization. Scored on held-out
data every scheme alike: perplexity on the held-out play and on WikiText-2's test split,
KL(teacher || student) on the play; bits per weight of the binarized layers (what ``pack()``
stores, scales included). Prints mean ± sd over seeds and the paired differences against
``fp`` and against ``fbi`` (per seed, same data and targets) with their 95% t intervals.
Each seed's results go to ``--results/seed_N<tag>.json`` (rewritten atomically after every
run), so seeds and schemes may run as separate processes side by side (``--seeds 1`` in one,
``--seeds 2 --schemes pbllm --tag _pbllm`` in another); the table merges every seed file of
the same ``--steps`` and shows the schemes every seed has.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from binary_vs_fp import bits  # noqa: E402  (sibling scripts: bench/ is sys.path[0])
from fbi.binarize import SCHEMES  # noqa: E402
from fbi.configure import compose  # noqa: E402
from fbi.deepspeed_setup import init_distributed  # noqa: E402
from fbi.distill.cache_writer import part_seed  # noqa: E402
from fbi.loop import train_step  # noqa: E402
from fbi.run import build_run  # noqa: E402
from study_results import MAX_SEEDS, load, tables, write_atomic  # noqa: E402
from targets_study import (DIGITS, METRICS, MemoryTargets, consumed_ids, held_out,  # noqa: E402
                           wikitext_tokens)

TARGETS = "sampled12"  # conf/teacher/cache.yaml's default


def config(out: Path, scheme: str, seed: int, steps: int):
    return compose(["experiment=demo", f"scheme={scheme}", f"run_dir={out / f'{scheme}_s{seed}'}",
                    f"seed={seed}", f"max_steps={steps}", f"checkpoint_every={10 * steps}",
                    "resume=false"])


class HeldOutTeacher:
    """The teacher's logits on the held-out batches, computed once and reused for every
    scheme (the same batches score every run of a seed)."""

    def __init__(self, teacher) -> None:
        self.teacher, self.seen = teacher, {}

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        key = ids.numpy().tobytes()
        if key not in self.seen:
            self.seen[key] = self.teacher.logits(ids).float()
        return self.seen[key]


def table(results: dict) -> str:
    runs = results["runs"]
    return "\n".join([
        f"fbi_tiny, demo corpus, {results['steps']} steps x 512 tokens, {TARGETS} targets from "
        f"SmolLM2-135M, seeds {results['seeds']} (mean ± sd)", "",
        *tables("scheme", runs, METRICS, DIGITS, ("fp", "fbi"),
                ("bits/weight", lambda name, rs: f"{rs[0]['bits_per_weight']:.3f}"))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schemes", nargs="+", default=sorted(SCHEMES))
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_schemes_study")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "schemes_study")
    parser.add_argument("--table", action="store_true", help="only print the stored results' table")
    parser.add_argument("--tag", default="", help="suffix of this process's seed files, so that "
                        "processes running other schemes of the same seed keep their own")
    args = parser.parse_args()
    if args.table:
        return print(table(load(args.results, args.steps)))
    unknown = sorted(set(args.schemes) - set(SCHEMES))
    if unknown:
        parser.error(f"--schemes: {unknown} are not registered; choose from {sorted(SCHEMES)}")
    if len(args.seeds) > MAX_SEEDS:
        parser.error(f"--seeds: give 1 to {MAX_SEEDS} seeds (the t table's range)")
    schemes = sorted(args.schemes, key=lambda s: (s != "fp", s != "fbi", s))
    dist_info = init_distributed()
    out = args.out.resolve()
    teacher = None
    for seed in args.seeds:
        results: dict = {"steps": args.steps, "seed": seed, "targets": TARGETS,
                         "eval_batches": args.eval_batches, "runs": {}}
        teacher_run = build_run(config(out, "fp", seed, args.steps), dist_info)
        teacher = teacher or HeldOutTeacher(teacher_run.teacher)
        wikitext = wikitext_tokens(teacher_run.tokenizer)
        targets = MemoryTargets(TARGETS, teacher_run.train_data)
        for step, ids in enumerate(consumed_ids(teacher_run, args.steps)):
            batch = torch.from_numpy(teacher_run.train_data.batch(ids))
            targets.add(ids, teacher.teacher.logits(batch[:, :-1]).float(), part_seed(seed, step))
        del teacher_run
        for scheme in schemes:
            run = build_run(config(out, scheme, seed, args.steps), dist_info)
            run.teacher = targets
            start = time.perf_counter()
            losses = [train_step(run, [ids[i:i + run.cfg.micro_batch_size]
                                       for i in range(0, len(ids), run.cfg.micro_batch_size)])
                      ["loss"] for ids in consumed_ids(run, args.steps)]
            scores = {"bits_per_weight": bits(run.engine.module),
                      **held_out(run, teacher, wikitext, args.eval_batches, seed),
                      "train_s": time.perf_counter() - start, "final_loss": losses[-1]}
            results["runs"][scheme] = scores
            print(f"seed {seed} {scheme}: {scores}", flush=True)
            write_atomic(args.results / f"seed_{seed}{args.tag}.json", json.dumps(results, indent=1))
            del run
    print("\n" + table(load(args.results, args.steps)))


if __name__ == "__main__":
    main()
