"""GPU acceptance: every row of bench/gpu_rows.py, each in its own process under a time limit,
into DIR/gpu_check.json and DIR/gpu_check.md (run by bench/gpu_check.sh).

    python bench/gpu_check.py --out DIR [--device cuda|cpu] [--only row,row] [--row-limit 120]

The rows' fixtures (a BPE tokenizer and a tiny LLaMA teacher trained/built from the bundled
WikiText-2, the corpus train.py reads) are made once in DIR/work. Exit status: 0 when every
row is PASS or SKIP, 1 on any FAIL, ERROR or timeout, 2 when CUDA is asked for and absent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH.parent / "tests"))  # fbi_testing: the suite's own fixtures

from gpu_rows import ROWS, Ctx  # noqa: E402

# Seconds per row on one H100 are far below these; a row past its limit is killed (with
# everything it started) and reported ERROR, so a hang in NCCL or CUDA is bounded. The ops
# row may compile DeepSpeed's FusedAdam and CPUAdam first (about a minute on 16 cores); the
# peak-memory and throughput rows build fbi_130m and fbi_1p3b in a process each.
ROW_LIMIT_S = 150
LONGER = {"deepspeed_ops": 300, "peak_memory": 200, "throughput": 240}


class TimeLimit(Exception):
    """gpu_check.sh's overall limit (SIGTERM from ``timeout``)."""


def on_term(signum, frame):
    raise TimeLimit


def make_fixtures(work: Path) -> None:
    """Tokenizer, corpus and tiny teacher from the repository's WikiText-2; no network."""
    from fbi_testing import make_teacher, make_tokenizer, wikitext_lines

    if (work / "teacher" / "config.json").exists():
        return
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    lines = wikitext_lines(120_000)
    for i in range(3):
        (corpus / f"part{i}.txt").write_text("\n".join(lines[i::3]))
    make_tokenizer(work / "tokenizer", 512, wikitext_lines(200_000))
    make_teacher(work / "teacher", work / "tokenizer")


def run_row(name: str, args, work: Path) -> dict:
    """One row in a child process of its own session: on timeout the whole group is killed."""
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--row", name, "--device", args.device,
           "--work", str(work), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--result", str(result)]
    started = time.monotonic()
    log = (work / f"{name}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    limit = max(args.row_limit, LONGER.get(name, 0))
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pass
    finally:  # also on TimeLimit: the row's processes end with the check
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    seconds = time.monotonic() - started
    if result.exists():
        row = json.loads(result.read_text())
    elif seconds >= limit:
        row = {"verdict": "ERROR", "figures": f"timed out after {limit} s (killed)",
               "data": {}}
    else:
        tail = (work / f"{name}.log").read_text().strip().splitlines()[-1:] or ["no output"]
        row = {"verdict": "ERROR", "figures": f"exit {proc.returncode}: {tail[0][:300]}",
               "data": {}}
    return {"row": name, **row, "seconds": round(seconds, 1)}


def one_row(args) -> int:
    """The child: run one row, write its result; an exception is the row's ERROR."""
    ctx = Ctx(device=args.device, work=Path(args.work), row=args.row, seq_len=args.seq_len,
              steps=args.steps)
    try:
        verdict, figures, data = ROWS[args.row](ctx)
    except Exception as err:  # a row's failure is its verdict, with the error that caused it
        import traceback

        traceback.print_exc()
        verdict, figures, data = "ERROR", f"{type(err).__name__}: {str(err)[:300]}", {}
    Path(args.result).write_text(json.dumps(
        {"verdict": verdict, "figures": figures, "data": data}, default=str))
    return 0


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| row | verdict | s | figures |", "|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['verdict']} | {r['seconds']:.0f} | "
              f"{' '.join(r['figures'].split()).replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--only", default=",".join(ROWS))
    parser.add_argument("--row-limit", type=int, default=ROW_LIMIT_S)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        return one_row(args)
    import torch

    unknown = set(args.only.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"--only: no row {', '.join(sorted(unknown))}; rows: {', '.join(ROWS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}). On a machine without a GPU run it with --device cpu.",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":  # the rows' processes share a small machine: one thread each
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    signal.signal(signal.SIGTERM, on_term)
    rows = []
    try:
        make_fixtures(work)
        for name in args.only.split(","):
            rows.append(run_row(name, args, work))
            r = rows[-1]
            print(f"  {name}: {r['verdict']} ({r['seconds']:.0f} s) {r['figures']}",
                  file=sys.stderr, flush=True)
    except TimeLimit:
        rows.append({"row": "(time limit)", "verdict": "ERROR", "seconds": 0, "data": {},
                     "figures": f"the overall limit ended the check after "
                                f"{time.monotonic() - started:.0f} s"})
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    header = (f"GPU acceptance on {device}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
              f" {time.monotonic() - started:.0f} s")
    (out / "gpu_check.json").write_text(json.dumps(
        {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
         "seconds": round(time.monotonic() - started), "rows": rows}, indent=1, default=str))
    (out / "gpu_check.md").write_text(table(rows, header))
    print(table(rows, header))
    return 0 if all(r["verdict"] in ("PASS", "SKIP") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
