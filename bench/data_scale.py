"""The data path at two corpus sizes, and preparation with 1 and 2 workers, side by side.

    python bench/data_scale.py [--small 20e6] [--large 2e9] [--out DIR] [--baseline-repo DIR]
                               [--prep-tokens 3e6] [--skip-train] [--skip-train-py]
                               [--skip-prepare] [--keep]

1. Writes two synthetic shard sets of random uint16 ids (``--small`` and ``--large`` tokens,
   50M-token shards, one random block written to every shard: generated in seconds, checksums
   computed once) for the demo teacher's tokenizer, with a 1% validation split.
2. Start-up: ``train.py experiment=demo data=shards data.seq_len=128 max_steps=1`` on each
   set, as a child process: the seconds until its first step is in metrics.jsonl, and its
   peak resident set (``wait4``). The page cache is dropped before each run where this process may
   (``/proc/sys/vm/drop_caches``). With ``--baseline-repo`` (a checkout of an older fbi, e.g.
   one before issue 18), the same runs with that code on the same shards (format-1 manifest).
   Also the data path alone in a fresh process (after its imports): open the split, build
   the sampler, read a batch far into the run (seconds and peak RSS; median of 3 rounds,
   the two sets alternating).
3. Manifest size of each set.
4. Preparation tokens/s: ``python -m fbi data prepare`` on a text corpus (WikiText-2 cut into
   jsonl files) with 1 worker, then 2 workers at once; and on the same corpus as token ids
   (jsonl ``token_ids``, as Amber ships) with 1 and 2 workers. Wall time includes each
   process's start (imports, tokenizer); the workers' own rate is tokens / tokenizing seconds.

Prints one JSON object; the large set is deleted at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbi.configure import compose  # noqa: E402
from fbi.data.shards import FORMAT, Manifest, ShardInfo  # noqa: E402
from fbi.data.tokenizer import load_tokenizer  # noqa: E402
from fbi.distill.teacher_checkpoint import resolve_path  # noqa: E402

SHARD = 50_000_000


def synthetic_shards(directory: Path, tokens: int, tokenizer, fmt: int) -> Path:
    """``tokens`` random ids as 50M-token shards (the same block in each), 1% validation."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    block = rng.integers(0, tokenizer.vocab_size, min(SHARD, tokens), dtype=np.uint16)
    splits = {"train": [], "val": []}
    val_tokens = max(tokens // 100, 100_000)
    for split, total in (("train", tokens - val_tokens), ("val", val_tokens)):
        for k, start in enumerate(range(0, total, SHARD)):
            part = block[: min(SHARD, total - start)]
            name = f"{split}_{k:05d}.bin"
            part.tofile(directory / name)
            digest = hashlib.sha256(part.tobytes()).hexdigest()
            splits[split].append(ShardInfo(name, len(part), digest))
    manifest = Manifest(tokenizer.fingerprint, tokenizer.source, tokenizer.vocab_size, "uint16",
                        splits, {"synthetic": tokens}, {}, fmt)
    if fmt == 1:
        write_format1(manifest, directory)
    else:
        manifest.save(directory)
    return directory


def write_format1(manifest: Manifest, directory: Path) -> None:
    """The manifest as an fbi before issue 18 reads it: no format field."""
    raw = {k: v for k, v in json.loads(json.dumps(manifest, default=vars)).items()
           if k != "format"}
    (directory / "manifest.json").write_text(json.dumps(raw, indent=1))


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def child(argv: list[str], cwd: Path, log: Path, until=None, timeout: float = 1200) -> dict:
    """Run ``argv`` (output to ``log``); seconds until ``until()`` is true, seconds to the
    exit, and the child's peak resident set (from ``wait4``)."""
    cold = drop_caches()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    reached = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if reached is None and until is not None and until():
            reached = time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            proc.kill()
        time.sleep(0.02)
    total = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{argv} failed:\n{log.read_text()[-3000:]}")
    return {"to_first_step_s": reached if reached is not None else total, "total_s": total,
            "peak_rss_mb": usage.ru_maxrss / 1024, "cold_cache": cold}


def first_step_written(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    return lambda: path.exists() and '"loss"' in path.read_text()


def train_start(repo: Path, shards: Path, run_dir: Path) -> dict:
    argv = [sys.executable, "train.py", "experiment=demo", "data=shards",
            f"data.shards_dir={shards}", "max_steps=1", "eval_batches=0", f"run_dir={run_dir}",
            "resume=false", "logging.log_every=1", "data.seq_len=128"]
    result = child(argv, repo, run_dir.with_suffix(".log"), first_step_written(run_dir))
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


DATA_ALONE = """
import resource, sys, time
from fbi.data.mixture import make_sampler, open_train
from fbi.config import DataConfig
t = time.perf_counter()
cfg = DataConfig(corpus=None, shards_dir=sys.argv[1], seq_len=2048)
data = open_train(cfg, cfg.shards_dir)
sampler = make_sampler(data, cfg, 0)
batch = data.batch(sampler.micro_batch_ids(data.num_samples * 3 // 2, 8, 0, 0, 1))
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def data_alone(shards: Path) -> dict:
    """Open the train split, build the sampler and read one batch half an epoch into the
    second epoch, in a fresh process after its imports, cold cache: seconds and peak RSS."""
    drop_caches()
    out = subprocess.run([sys.executable, "-c", DATA_ALONE, str(shards)], cwd=REPO,
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds, rss = map(float, out.stdout.split())
    return {"open_sample_read_s": seconds, "peak_rss_mb": rss}


def median_of(runs: list[dict]) -> dict:
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


def prep_corpus(directory: Path, tokens: float, tokenizer, ids: bool) -> Path:
    """WikiText-2 (test + valid) repeated to about ``tokens`` tokens, 8 jsonl files of
    documents of ~40 lines; with ``ids`` the same documents as token ids."""
    directory.mkdir(parents=True)
    lines = [s for f in ("test.txt", "valid.txt")
             for s in (REPO / "data" / "wikitext-2" / f).read_text().splitlines() if s.strip()]
    docs = ["\n".join(lines[i: i + 40]) for i in range(0, len(lines), 40)]
    per_doc = np.mean([len(d) for d in tokenizer.encode(docs[:50])])
    docs = docs * max(1, int(tokens / per_doc / len(docs)) + 1)
    docs = docs[: int(tokens / per_doc)]
    for f in range(8):
        chunk = docs[f::8]
        rows = ([{"token_ids": t} for t in tokenizer.encode(chunk)] if ids
                else [{"text": d} for d in chunk])
        (directory / f"part{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def prepare_rate(corpus: Path, tokenizer_path: str, out: Path, workers: int, ids: bool) -> dict:
    extra = ["data.token_field=token_ids", "data.separator=none"] if ids else []
    argv = [sys.executable, "-m", "fbi", "data", "prepare", "teacher=none",
            f"tokenizer.path={tokenizer_path}", "data=files", f"data.files=[{corpus}/*.jsonl]",
            f"data.shards_dir={out}", f"cache_dir={out.parent}", *extra]
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    procs = [subprocess.Popen(argv + ["--worker", str(w), "--workers", str(workers)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env})
             for w in range(workers)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(stderr[-3000:])
        results.append(json.loads(stdout))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    shutil.rmtree(out)
    return {"workers": workers, "tokens": tokens, "wall_s": wall,
            "tokenizing_s": max(r["seconds"] for r in results),
            "tokens_per_s_wall": tokens / wall,
            "tokens_per_s_per_worker": [r["tokens_per_s"] for r in results]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", type=float, default=20e6)
    p.add_argument("--large", type=float, default=2e9)
    p.add_argument("--prep-tokens", type=float, default=3e6)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--baseline-repo", type=Path, default=None)
    p.add_argument("--skip-train", action="store_true", help="no shard sets, no start-up")
    p.add_argument("--skip-train-py", action="store_true",
                   help="shard sets and the data path alone, without train.py runs")
    p.add_argument("--skip-prepare", action="store_true")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fbi-data-scale-"))
    tok_path = str(resolve_path(compose(["experiment=demo"]).teacher))
    tokenizer = load_tokenizer(tok_path)
    report: dict = {"cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}
    if not args.skip_train:
        sets = {}
        for name, tokens in (("small", int(args.small)), ("large", int(args.large))):
            t = time.perf_counter()
            sets[name] = synthetic_shards(out / name, tokens, tokenizer, FORMAT)
            report[f"{name}_tokens"] = tokens
            report[f"{name}_generate_s"] = time.perf_counter() - t
            report[f"{name}_manifest_bytes"] = (sets[name] / "manifest.json").stat().st_size
        rounds = [{name: data_alone(shards) for name, shards in sets.items()} for _ in range(3)]
        for name in sets:
            report[f"{name}_data_alone"] = median_of([r[name] for r in rounds])
        for name, shards in sets.items():
            if not args.skip_train_py:
                report[f"{name}_train"] = train_start(REPO, shards, out / f"run-{name}")
        if args.baseline_repo and not args.skip_train_py:
            for name, shards in sets.items():
                old = out / f"{name}-format1"
                old.mkdir()
                for f in shards.glob("*.bin"):
                    os.symlink(f, old / f.name)
                write_format1(Manifest.load(shards), old)
                report[f"{name}_train_baseline"] = train_start(args.baseline_repo.resolve(), old,
                                                               out / f"run-old-{name}")
        keys = ("data_alone",) + (() if args.skip_train_py else ("train",)) + (
            ("train_baseline",) if args.baseline_repo and not args.skip_train_py else ())
        for key in keys:
            small, large = report[f"small_{key}"], report[f"large_{key}"]
            seconds = "open_sample_read_s" if key == "data_alone" else "to_first_step_s"
            report[f"large_minus_small_{key}"] = {
                "seconds": large[seconds] - small[seconds],
                "peak_rss_mb": large["peak_rss_mb"] - small["peak_rss_mb"]}
        if not args.keep:
            shutil.rmtree(out / "large")
            shutil.rmtree(out / "large-format1", ignore_errors=True)
    if not args.skip_prepare:
        for ids in (False, True):
            kind = "token_ids" if ids else "text"
            corpus = prep_corpus(out / f"corpus-{kind}", args.prep_tokens, tokenizer, ids)
            one = prepare_rate(corpus, tok_path, out / f"prep-{kind}-1", 1, ids)
            two = prepare_rate(corpus, tok_path, out / f"prep-{kind}-2", 2, ids)
            report[f"prepare_{kind}"] = {
                "one": one, "two": two, "speedup_wall": one["wall_s"] / two["wall_s"],
                "speedup_tokenizing": one["tokenizing_s"] / two["tokenizing_s"]}
    report["load_avg_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
