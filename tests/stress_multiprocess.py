"""The suite's multi-process tests, run again and again on a loaded machine: how often each
one passes. A test that fails here now and then is a flake to fix at its cause.

    .venv/bin/python tests/stress_multiprocess.py                  # every `multiprocess` test, 5 runs
    .venv/bin/python tests/stress_multiprocess.py --runs 10 tests/test_sign_gather.py::test_traffic_bench_counts_one_sixteenth_with_activation_checkpointing

Each run is one pytest session (``-n 0``, fresh fixtures) over the selected tests (``-m
multiprocess`` and any paths or node ids given); ``--parallel`` sessions run at once, so every
test has a second pytest worker beside it, and ``--burners`` busy-looping processes load the
CPUs for the whole check. Both are started and stopped here. Each session's log and JUnit XML
stay under ``--out``. Exit status 0 only when every test passed in every run.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def outcomes(junit: Path) -> dict[str, str]:
    """``{test: "passed" | "failed" | "skipped"}`` from one session's JUnit XML."""
    found = {}
    for case in ET.parse(junit).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            found[test] = "failed"
        elif case.find("skipped") is not None:
            found[test] = "skipped"
        else:
            found[test] = "passed"
    return found


def session(run: int, out: Path, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
           "-m", args.marker, f"--junitxml={out / f'run{run}.xml'}", *args.tests]
    with (out / f"run{run}.log").open("w") as log:  # a process group of its own: see main
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tests", nargs="*", help="test paths or node ids (default: all of tests/)")
    parser.add_argument("--runs", type=int, default=5, help="times each test runs")
    parser.add_argument("--parallel", type=int, default=2, help="pytest sessions at once")
    parser.add_argument("--burners", type=int, default=1, help="busy-looping CPU burners")
    parser.add_argument("--marker", default="multiprocess", help="pytest -m expression")
    parser.add_argument("--out", type=Path, help="logs and JUnit XML (default: a new temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fbi-stress-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.runs} runs, {args.parallel} at once, {args.burners} CPU burner(s); logs in {out}",
          flush=True)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(args.burners)]
    waiting, running, status = list(range(1, args.runs + 1)), {}, {}
    start = time.monotonic()
    try:
        while waiting or running:
            while waiting and len(running) < args.parallel:
                run = waiting.pop(0)
                running[run] = session(run, out, args)
            time.sleep(1)
            for run, proc in list(running.items()):
                if proc.poll() is not None:
                    status[run] = running.pop(run).returncode
                    print(f"run {run}: pytest exit {status[run]} after "
                          f"{time.monotonic() - start:.0f} s", flush=True)
    finally:
        for proc in running.values():  # interrupted: the session and the torchrun jobs it started
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in burners:
            proc.terminate()
        for proc in [*running.values(), *burners]:
            proc.wait()
    return report(out, status, args.runs)


def report(out: Path, status: dict[int, int], runs: int) -> int:
    """Per test: runs passed, failed, skipped; and which runs' logs show the failures."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failed_in: dict[str, list[int]] = collections.defaultdict(list)
    for run in sorted(status):
        junit = out / f"run{run}.xml"
        if not junit.exists():  # pytest itself failed (collection error, killed): see its log
            print(f"run {run}: no results, pytest exit {status[run]}; see {out / f'run{run}.log'}")
            continue
        for test, outcome in outcomes(junit).items():
            counts[test][outcome] += 1
            if outcome == "failed":
                failed_in[test].append(run)
    print(f"\n| passed | failed | skipped | test |  ({runs} runs)\n|---|---|---|---|")
    for test in sorted(counts):
        c = counts[test]
        print(f"| {c['passed']} | {c['failed']} | {c['skipped']} | {test} |")
    for test, where in failed_in.items():
        print(f"{test} failed in: " + ", ".join(str(out / f"run{r}.log") for r in where))
    complete = len(status) == runs and all((out / f"run{r}.xml").exists() for r in status)
    clean = all(c["passed"] + c["skipped"] == runs for c in counts.values())
    return 0 if counts and complete and clean else 1


if __name__ == "__main__":
    sys.exit(main())
