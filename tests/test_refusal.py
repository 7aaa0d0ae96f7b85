"""The one boundary of every entry (python -m fbi's verbs, train.py): errors an input can cause
become one paragraph and exit 2, halts exit 3, FBI_DEBUG=1 re-raises, bugs keep their
traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fbi.config import ConfigError
from fbi.refusal import refusals


def raising(err: BaseException):
    def body():
        raise err
    return body


def empty_npy(tmp_path):
    (tmp_path / "e.npy").write_bytes(b"")
    return lambda: np.load(tmp_path / "e.npy")


CASES = [
    (lambda tmp: raising(ConfigError("data.files: x is bad; fix it")), "data.files: x is bad; fix it"),
    (lambda tmp: lambda: open(tmp / "missing.txt"), "FileNotFoundError: [Errno 2]"),
    (lambda tmp: lambda: json.loads("{\n"), "JSONDecodeError: Expecting property name"),
    (lambda tmp: lambda: b"caf\xe9".decode(), "UnicodeDecodeError: 'utf-8' codec"),
    (empty_npy, "EOFError: No data left in file"),
    (lambda tmp: lambda: [][3], "IndexError: list index out of range"),
    (lambda tmp: raising(FileNotFoundError("tokenizer.path: /t does not exist")),
     "tokenizer.path: /t does not exist"),
]


@pytest.mark.parametrize("make,start", CASES)
def test_an_input_error_is_one_paragraph_and_exit_2(tmp_path, make, start, monkeypatch):
    monkeypatch.delenv("FBI_DEBUG", raising=False)
    said, codes = [], []
    with pytest.raises(SystemExit):
        with refusals("prog", say=said.append, exit=lambda c: codes.append(c) or exit_(c)):
            make(tmp_path)()
    assert codes == [2] and len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith(f"prog: {start}")
    if not start.startswith(("data.files", "tokenizer.path")):  # not worded by fbi: say how to see more
        assert "FBI_DEBUG=1" in said[0]
    if "Errno" in start:  # an OSError names its file
        assert "missing.txt" in said[0]


def exit_(code):
    raise SystemExit(code)


def test_halts_exit_3_debug_reraises_and_bugs_pass_through(monkeypatch):
    class Halted(RuntimeError):
        pass

    said = []
    with pytest.raises(SystemExit) as exit_info:
        with refusals(None, halts=(Halted,), say=said.append):
            raise Halted("loss is NaN at step 7; see metrics.jsonl")
    assert exit_info.value.code == 3 and said == ["loss is NaN at step 7; see metrics.jsonl"]
    with pytest.raises(RuntimeError, match="a bug"):  # not an input error: its traceback stays
        with refusals("prog", say=said.append):
            raise RuntimeError("a bug")
    monkeypatch.setenv("FBI_DEBUG", "1")
    with pytest.raises(ConfigError):
        with refusals("prog", say=said.append):
            raise ConfigError("x")
    assert len(said) == 1
