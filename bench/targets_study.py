"""Which teacher target teaches best at equal tokens: the study behind the cache's defaults.

    python bench/targets_study.py [--steps 40] [--seeds 0 1 2] [--sources ...] [--out DIR]
    python bench/targets_study.py --steps 100 --table   # the table from the stored per-seed results

Demo setup (SmolLM2-135M teacher, fbi_tiny binary student, Shakespeare + Milton, 4 x 128
tokens per step). Each source trains a fresh student for ``--steps`` steps per seed (the seed
sets the student's initialization, the sample order and the sampled draws); then the student's
validation perplexity on the held-out play and on WikiText-2 (test split, the repo's
data/wikitext-2: text it never trained on), and, for every source alike, KL(teacher || student)
on held-out batches: the quantity that compares sources whose own losses do not. The
held-out windows are drawn across each whole text by the seed. Each seed's results go to
``--results/seed_N.json`` (rewritten atomically after every run); the table merges every
seed file of the same ``--steps`` and adds the paired differences against ``sampled12`` (the
default) and against ``topk12_label_u8`` (top-k's default) with their 95% t intervals.

``--metric-check N`` instead checks the training log's comparable metric: for a student at
initialization and after N online steps, each source's own ``distill`` and its ``soft_ce``
(fbi/distill/loss.py) on the same held-out batches, against the exact soft cross-entropy
from the dense teacher.

Sources: ``ce`` (labels only), ``online`` (the dense teacher at every step), ``topkK`` (k
ids + lumped tail, as stored in float16), ``topkK_label`` (the tail mass on the label where
it is outside the k ids), ``topkK_u8`` / ``topkK_label_u8`` (uint8 units, fbi/distill/rows.py),
``sampledD`` (D draws). Cache targets are made in memory with the cache writer's own
encoders from one teacher pass over the samples the runs consume (what the cache would hold
for them, byte for byte in the stored precision), so no cache of the whole split is written.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbi.configure import compose  # noqa: E402
from fbi.data.sampler import GlobalSampler  # noqa: E402
from fbi.deepspeed_setup import init_distributed  # noqa: E402
from fbi.distill.cache_writer import encode_sampled, encode_topk, part_seed  # noqa: E402
from fbi.distill.loss import distillation_loss, mean_token_nll  # noqa: E402
from fbi.distill.rows import decode_units, encode_units  # noqa: E402
from fbi.distill.targets import SparseTargets, label_tail  # noqa: E402
from fbi.distill.teacher import NoTeacher, Ready  # noqa: E402
from fbi.eval.perplexity import read_text  # noqa: E402
from fbi.loop import train_step  # noqa: E402
from fbi.run import build_run  # noqa: E402
from study_results import MAX_SEEDS, load, tables, write_atomic  # noqa: E402

DEFAULT_SOURCES = ["ce", "online", "topk8", "topk8_label", "topk32", "topk32_label",
                   "topk12_label_u8", "sampled8", "sampled16", "sampled32"]
BASE = "sampled12"  # conf/teacher/cache.yaml's default: every row is compared with it
METRICS = {"ppl_play": "val ppl, play", "ppl_wikitext2": "val ppl, WikiText-2",
           "kl_teacher": "KL(teacher‖student)"}
DIGITS = {"ppl_play": 1, "ppl_wikitext2": 1, "kl_teacher": 3}


def config(out: Path, name: str, seed: int, steps: int):
    return compose(["experiment=demo", f"run_dir={out / f'{name}_s{seed}'}", f"seed={seed}",
                    f"max_steps={steps}", f"checkpoint_every={10 * steps}", "resume=false",
                    "eval_batches=16"])


def consumed_ids(run, steps: int) -> list[list[int]]:
    sampler = GlobalSampler(run.train_data.num_samples, run.cfg.seed)
    return [[i for a in range(run.grad_accum)
             for i in sampler.micro_batch_ids(s * run.cfg.global_batch_size,
                                              run.cfg.micro_batch_size, a, 0, 1)]
            for s in range(steps)]


class MemoryTargets(Ready):
    """Sparse targets of one kind for the samples a run consumes, as the cache stores them."""

    kind = "cache"

    def __init__(self, name: str, train) -> None:
        spec = re.fullmatch(r"(topk|sampled)(\d+)(_label)?(_u8)?", name)
        self.mode, self.slots = spec[1], int(spec[2])
        self.label, self.u8 = bool(spec[3]), bool(spec[4])
        self.vocab_size, self.rows, self.train = None, {}, train

    def add(self, ids: list[int], logits: torch.Tensor, seed: int) -> None:
        """The targets of samples ``ids`` from the teacher's (B, S, V) ``logits``."""
        self.vocab_size = logits.shape[-1]
        if self.mode == "sampled":
            top, counts = encode_sampled(logits, self.slots, 1.0, seed)
            weights, tail = counts.float() / self.slots, None
        else:
            top, logp, log_tail = encode_topk(logits, self.slots, 1.0)
            if self.u8:
                units = encode_units(logp, log_tail, torch.Generator().manual_seed(seed))
                weights, tail = decode_units(units.numpy())
            else:  # float16 as stored
                weights, tail = logp.half().float().exp(), log_tail.half().float().exp()
        for j, i in enumerate(ids):
            self.rows[i] = (top[j], weights[j], None if tail is None else tail[j])

    def targets(self, sample_ids, inputs):
        rows = [self.rows[int(i)] for i in sample_ids]
        t = SparseTargets(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                          None if rows[0][2] is None else torch.stack([r[2] for r in rows]))
        if self.label:
            labels = torch.from_numpy(self.train.batch(sample_ids)[:, 1:].astype(np.int64))
            t = label_tail(t, labels)
        return t

    def val_ppl(self, measure):
        return None


def bytes_per_token(name: str, vocab: int) -> float:
    if name in ("ce", "online"):
        return float("nan")
    spec = re.fullmatch(r"(topk|sampled)(\d+)(_label)?(_u8)?", name)
    slots, id_bytes = int(spec[2]), 2 if vocab <= 2**16 else 4
    if spec[1] == "sampled":
        return slots * (id_bytes + 1)
    return slots * (id_bytes + 1) if spec[4] else slots * (id_bytes + 2) + 2


def wikitext_tokens(tokenizer) -> torch.Tensor:
    """The repo's WikiText-2 test split (text no run trains on), as one token stream."""
    text = read_text(REPO / "data" / "wikitext-2" / "test.txt", "wikitext")
    return torch.tensor(tokenizer.encode([text])[0])


@torch.no_grad()
def held_out(run, teacher, wikitext: torch.Tensor, batches: int, seed: int) -> dict:
    """Student ppl on the held-out play and on WikiText-2; KL(teacher || student) on the play.

    The windows are drawn across each whole text by ``seed``: every run of one seed is scored
    on the same windows (so runs pair), each seed on others (so the seed spread includes
    which text was scored)."""
    run.engine.eval()
    bs, seq = run.cfg.micro_batch_size, run.cfg.data.seq_len
    g = torch.Generator().manual_seed(seed)
    play = torch.randperm(run.val_data.num_samples, generator=g)[:batches * bs].tolist()
    starts = torch.randint(0, len(wikitext) - seq, (batches * bs,), generator=g).tolist()
    nll = tok = kl = w_nll = w_tok = 0.0
    for b in range(batches):
        batch = torch.from_numpy(run.val_data.batch(play[b * bs:(b + 1) * bs]))
        s = run.engine(batch[:, :-1]).float()
        mean, n = mean_token_nll(s, batch[:, 1:])
        nll, tok = nll + mean.item() * n.item(), tok + n.item()
        logp_t = torch.log_softmax(teacher.logits(batch[:, :-1]).float(), -1)
        kl += (logp_t.exp() * (logp_t - torch.log_softmax(s, -1))).sum(-1).mean().item()
        chunk = torch.stack([wikitext[i:i + seq + 1] for i in starts[b * bs:(b + 1) * bs]])
        mean, n = mean_token_nll(run.engine(chunk[:, :-1]).float(), chunk[:, 1:])
        w_nll, w_tok = w_nll + mean.item() * n.item(), w_tok + n.item()
    run.engine.train()
    return {"ppl_play": math.exp(nll / tok), "ppl_wikitext2": math.exp(w_nll / w_tok),
            "kl_teacher": kl / batches}


@torch.no_grad()
def metric_rows(run, teacher, sources: list[str], batches: int) -> dict:
    """Mean over held-out batches of each source's (distill, soft_ce), and the exact value."""
    run.engine.eval()
    bs, sums = run.cfg.micro_batch_size, {}
    for b in range(batches):
        ids = list(range(b * bs, (b + 1) * bs))
        batch = torch.from_numpy(run.val_data.batch(ids))
        student, labels = run.engine(batch[:, :-1]).float(), batch[:, 1:]
        logits = teacher.logits(batch[:, :-1]).float()
        found = {"exact": distillation_loss(student, logits, labels)}
        for name in sources:
            targets = MemoryTargets(name, run.val_data)
            targets.add(ids, logits, part_seed(0, b))
            found[name] = distillation_loss(student, targets.targets(ids, None), labels)
        for name, out in found.items():
            previous = sums.get(name, (0.0, 0.0))
            sums[name] = (previous[0] + out.distill.item() / batches,
                          previous[1] + out.soft_ce.item() / batches)
    run.engine.train()
    return sums


def metric_check(out: Path, sources: list[str], steps: int, batches: int, dist_info) -> None:
    run = build_run(config(out, "metric_check", 0, steps), dist_info)
    teacher, found = run.teacher, {}
    found[0] = metric_rows(run, teacher, sources, batches)
    for ids in consumed_ids(run, steps):
        train_step(run, [ids[i:i + run.cfg.micro_batch_size]
                         for i in range(0, len(ids), run.cfg.micro_batch_size)])
    found[steps] = metric_rows(run, teacher, sources, batches)
    print(f"\nthe same student, {batches} held-out batches: each source's distill | soft_ce "
          "(exact: dense teacher)")
    print("| source | " + " | ".join(f"distill, step {s} | soft_ce, step {s}" for s in found)
          + " |")
    print("|---|" + "---|---|" * len(found))
    for name in ["exact"] + sources:
        print(f"| {name} | " + " | ".join(f"{found[s][name][0]:.3f} | {found[s][name][1]:.3f}"
                                           for s in found) + " |")


def table(results: dict) -> str:
    runs = results["runs"]
    vocab = 2**16  # SmolLM2's 49,152 ids fit uint16
    return "\n".join([
        f"fbi_tiny binary student, demo corpus, {results['steps']} steps x 512 tokens, "
        f"seeds {results['seeds']} (mean ± sd)", "",
        *tables("target", runs, METRICS, DIGITS, (BASE, "topk12_label_u8"),
                ("bytes/token", lambda name, rs: f"{bytes_per_token(name, vocab):.0f}"))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", default=DEFAULT_SOURCES)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_targets_study")
    parser.add_argument("--results", type=Path,
                        default=REPO / "bench" / "results" / "targets_study")
    parser.add_argument("--table", action="store_true", help="only print the stored results' table")
    parser.add_argument("--metric-check", type=int, metavar="N", default=None)
    args = parser.parse_args()
    if args.table:
        return print(table(load(args.results, args.steps)))
    if len(args.seeds) > MAX_SEEDS:
        parser.error(f"--seeds: give 1 to {MAX_SEEDS} seeds (the t table's range)")
    dist_info = init_distributed()
    out = args.out.resolve()
    if args.metric_check is not None:
        sparse = [n for n in args.sources if n not in ("ce", "online")]
        return metric_check(out, sparse, args.metric_check, args.eval_batches, dist_info)
    for seed in args.seeds:
        results: dict = {"steps": args.steps, "seed": seed, "eval_batches": args.eval_batches,
                         "runs": {}}
        teacher_run = build_run(config(out, "teacher", seed, args.steps), dist_info)
        teacher = teacher_run.teacher
        wikitext = wikitext_tokens(teacher_run.tokenizer)
        sparse = {n: MemoryTargets(n, teacher_run.train_data) for n in args.sources
                  if n not in ("ce", "online")}
        for step, ids in enumerate(consumed_ids(teacher_run, args.steps)):
            batch = torch.from_numpy(teacher_run.train_data.batch(ids))
            logits = teacher.logits(batch[:, :-1]).float()  # one pass for every sparse kind
            for targets in sparse.values():
                targets.add(ids, logits, part_seed(seed, step))
        for name in args.sources:
            run = build_run(config(out, name, seed, args.steps), dist_info)
            run.teacher = (NoTeacher() if name == "ce" else teacher if name == "online"
                           else sparse[name])
            start = time.perf_counter()
            losses = [train_step(run, [ids[i:i + run.cfg.micro_batch_size]
                                       for i in range(0, len(ids), run.cfg.micro_batch_size)])
                      ["loss"] for ids in consumed_ids(run, args.steps)]
            scores = held_out(run, teacher, wikitext, args.eval_batches, seed)
            scores.update(train_s=time.perf_counter() - start, final_loss=losses[-1])
            results["runs"][name] = scores
            print(f"seed {seed} {name}: {scores}", flush=True)
            write_atomic(args.results / f"seed_{seed}.json", json.dumps(results, indent=1))
            del run
        del teacher_run, sparse
    print("\n" + table(load(args.results, args.steps)))


if __name__ == "__main__":
    main()
