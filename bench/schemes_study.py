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
import math
import os
import statistics
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
from fbi.eval.perplexity import read_text  # noqa: E402
from fbi.loop import train_step  # noqa: E402
from fbi.run import build_run  # noqa: E402
from targets_study import MemoryTargets, consumed_ids, held_out  # noqa: E402

TARGETS = "sampled12"  # conf/teacher/cache.yaml's default
METRICS = {"ppl_play": "val ppl, play", "ppl_wikitext2": "val ppl, WikiText-2",
           "kl_teacher": "KL(teacher‖student)"}
# two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}


def config(out: Path, scheme: str, seed: int, steps: int):
    return compose(["experiment=demo", f"scheme={scheme}", f"run_dir={out / f'{scheme}_s{seed}'}",
                    f"seed={seed}", f"max_steps={steps}", f"checkpoint_every={10 * steps}",
                    "resume=false"])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def paired(a: list[float], b: list[float]) -> tuple[float, float, bool]:
    """(mean of a - b, half-width of its 95% t interval, whether the interval excludes 0)."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return statistics.mean(d), math.nan, False
    half = T975[len(d) - 1] * statistics.stdev(d) / math.sqrt(len(d))
    return statistics.mean(d), half, abs(statistics.mean(d)) > half


def summary(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


class HeldOutTeacher:
    """The teacher's logits on the held-out batches, computed once and reused for every
    scheme (the same batches score every run)."""

    def __init__(self, teacher) -> None:
        self.teacher, self.seen = teacher, {}

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        key = ids.numpy().tobytes()
        if key not in self.seen:
            self.seen[key] = self.teacher.logits(ids).float()
        return self.seen[key]


def load(results_dir: Path, steps: int) -> dict:
    """Every stored seed of ``steps`` steps: {"steps", "seeds", "runs": {scheme: [per seed]}}."""
    by_seed: dict = {}
    for path in sorted(results_dir.glob("seed_*.json")):
        stored = json.loads(path.read_text())
        if stored["steps"] == steps:
            by_seed.setdefault(stored["seed"], {}).update(stored["runs"])
    seeds = sorted(by_seed)
    names = dict.fromkeys(n for runs in by_seed.values() for n in runs)  # first-run order
    runs = {n: [by_seed[s][n] for s in seeds] for n in names if all(n in by_seed[s] for s in seeds)}
    return {"steps": steps, "seeds": seeds, "runs": runs}


def table(results: dict) -> str:
    runs, seeds = results["runs"], results["seeds"]
    lines = [f"fbi_tiny, demo corpus, {results['steps']} steps x 512 tokens, "
             f"{TARGETS} targets from SmolLM2-135M, seeds {seeds} (mean ± sd)", "",
             "| scheme | bits/weight | " + " | ".join(METRICS.values()) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for scheme, rs in runs.items():
        lines.append(f"| {scheme} | {rs[0]['bits_per_weight']:.3f} | " + " | ".join(
            summary([r[m] for r in rs], 2 if m == "kl_teacher" else 1) for m in METRICS) + " |")
    for base in ("fp", "fbi"):
        if base not in runs:
            continue
        lines += ["", f"paired difference against {base} (mean, 95% interval; * excludes 0)", "",
                  "| scheme | " + " | ".join(METRICS.values()) + " |", "|---|" + "---|" * len(METRICS)]
        for scheme, rs in runs.items():
            if scheme == base or len(rs) != len(runs[base]):
                continue
            cells = []
            for m in METRICS:
                mean, half, separates = paired([r[m] for r in rs], [r[m] for r in runs[base]])
                digits = 2 if m == "kl_teacher" else 1
                cells.append(f"{mean:+.{digits}f} ± {half:.{digits}f}{' *' if separates else ''}")
            lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    if len(args.seeds) - 1 > max(T975):
        parser.error(f"--seeds: give 1 to {max(T975) + 1} seeds (the t table's range)")
    schemes = sorted(args.schemes, key=lambda s: (s != "fp", s != "fbi", s))
    dist_info = init_distributed()
    out = args.out.resolve()
    text = read_text(REPO / "data" / "wikitext-2" / "test.txt", "wikitext")
    teacher = None
    for seed in args.seeds:
        results: dict = {"steps": args.steps, "seed": seed, "targets": TARGETS,
                         "eval_batches": args.eval_batches, "runs": {}}
        teacher_run = build_run(config(out, "fp", seed, args.steps), dist_info)
        teacher = teacher or HeldOutTeacher(teacher_run.teacher)
        wikitext = torch.tensor(teacher_run.tokenizer.encode([text[:400_000]])[0])
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
                      **held_out(run, teacher, wikitext, args.eval_batches),
                      "train_s": time.perf_counter() - start, "final_loss": losses[-1]}
            results["runs"][scheme] = scores
            print(f"seed {seed} {scheme}: {scores}", flush=True)
            write_atomic(args.results / f"seed_{seed}{args.tag}.json", json.dumps(results, indent=1))
            del run
    print("\n" + table(load(args.results, args.steps)))


if __name__ == "__main__":
    main()
