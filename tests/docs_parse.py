"""Parse documented command lines with the commands' own argument parsers, running nothing.

Used by tests/test_docs.py, in one process for all commands: reads a JSON list of jobs
``{"module": "fbi.cli" | null, "path": "bench/x.py" | null, "argv": [...]}`` on stdin and
writes one JSON result per job: ``{"ok": true, "extras": [...]}`` when the command's parser
accepted ``argv`` (``extras``: what ``parse_known_args`` left over, such as Hydra overrides
for ``fbi.estimate`` or ``python -m fbi data prepare``), else ``{"ok": false, "error": ...}``.

Every ``argparse`` parse is intercepted: once the outermost parse succeeds, the command is
stopped by raising ``Parsed`` (a ``BaseException``, so no ``except Exception`` in the
command swallows it) before it does any work.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Parsed(BaseException):
    def __init__(self, extras: list[str]):
        super().__init__()
        self.extras = extras


_depth = 0
_parse_known_args = argparse.ArgumentParser.parse_known_args
_parse_args = argparse.ArgumentParser.parse_args


def parse_known_args(self, args=None, namespace=None):
    global _depth
    _depth += 1
    try:
        namespace, extras = _parse_known_args(self, args, namespace)
    finally:
        _depth -= 1
    if _depth == 0:
        raise Parsed(list(extras))
    return namespace, extras


def parse_args(self, args=None, namespace=None):
    global _depth
    _depth += 1  # parse_args calls parse_known_args: only this outer call stops the command
    try:
        _parse_args(self, args, namespace)  # unknown arguments: its own error, exit 2
    finally:
        _depth -= 1
    if _depth == 0:
        raise Parsed([])


def run(job: dict) -> dict:
    target = job["module"] or str(REPO / job["path"])
    sys.argv = [target, *job["argv"]]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            if job["module"]:
                runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, str(Path(target).parent))
                runpy.run_path(target, run_name="__main__")
    except Parsed as parsed:
        return {"ok": True, "extras": parsed.extras}
    except SystemExit as exit_:
        return {"ok": False, "error": f"exit {exit_.code}: {stderr.getvalue().strip()[-600:]}"}
    except Exception as err:  # noqa: BLE001  (reported to the test, with its type)
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[:600]}
    return {"ok": False, "error": "the command finished without parsing any arguments"}


def main() -> None:
    argparse.ArgumentParser.parse_known_args = parse_known_args
    argparse.ArgumentParser.parse_args = parse_args
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    jobs = json.load(sys.stdin)
    results = [run(job) for job in jobs]
    sys.__stdout__.write(json.dumps(results) + "\n")
    sys.__stdout__.flush()
    os._exit(0)  # skip teardown of whatever the commands imported (DeepSpeed's threads)


if __name__ == "__main__":
    main()
