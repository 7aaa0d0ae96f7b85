"""python -m fbi: wrong arguments are refused before anything loads, in one paragraph
(exit 2) that names the argument and the fix, and nothing is written."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from fbi.cli import main
from fbi.export.packed import export_packed
from fbi_testing import REPO, WIKITEXT

sys.path.insert(0, str(REPO / "tests" / "export"))
from test_packed import tiny_trained  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """A packed fbi export, a packed bitnet export (no HF export), a run with no checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    export_packed(tiny_trained("fbi", tokenizer_dir), root / "fbi")
    export_packed(tiny_trained("bitnet", tokenizer_dir), root / "bitnet")
    (root / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)  # not complete
    (root / "run" / "config.yaml").write_text("scheme: {name: fbi}\ndata: {seq_len: 32}\n")
    return root


def refusal(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


TEXT = str(WIKITEXT / "test.txt")


@pytest.mark.parametrize("argv,names", [
    (["eval", "{tmp}/nowhere", "--text", TEXT], ["MODEL", "nowhere", "not a folder"]),
    (["eval", "{run}", "--text", TEXT], ["MODEL", "no complete checkpoint", "save_every"]),
    (["eval", "{fbi}", "--tag", "step_9", "--text", TEXT], ["--tag", "leave --tag out"]),
    (["eval", "{fbi}"], ["--text FILE", "--blimp"]),
    (["eval", "{fbi}", "--text", "{tmp}/missing.txt"], ["--text", "missing.txt", "not a file"]),
    (["eval", "{fbi}", "--blimp", "{tmp}/no_blimp"], ["--blimp", "no_blimp", "data/blimp"]),
    (["eval", "{fbi}", "--text", TEXT, "--format", "markdown"], ["--format", "wikitext"]),
    (["eval", "{fbi}", "--text", TEXT, "--stride", "0"], ["--stride", "got 0", "positive"]),
    (["eval", "{fbi}", "--text", TEXT, "--context", "0"], ["--context", "got 0", "positive"]),
    (["eval", "{fbi}", "--text", TEXT, "--context", "16", "--stride", "20"], ["--stride", "at most"]),
    (["eval", "{fbi}", "--val", "{fbi}"], ["--val", "not a run directory"]),
    (["eval", "{fbi}", "--text", TEXT, "--device", "cuda:0"], ["--device", "--device cpu"]),
    (["export", "{bitnet}", "--format", "hf", "--out", "{out}"], ["--format hf", "bitnet", "--format packed"]),
    (["export", "{fbi}", "--format", "packed", "--fp-dtype", "fp8", "--out", "{out}"], ["--fp-dtype", "bfloat16"]),
    (["export", "{fbi}", "--format", "hf", "--dtype", "half", "--out", "{out}"], ["--dtype", "float16"]),
    (["generate", "{fbi}", "--prompt", "x", "--max-new-tokens", "0"], ["--max-new-tokens", "positive"]),
])
def test_refusals_name_the_argument_and_write_nothing(models, tmp_path, capsys, argv, names):
    if "cuda" in argv and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    paths = {"tmp": tmp_path, "run": models / "run", "fbi": models / "fbi",
             "bitnet": models / "bitnet", "out": tmp_path / "out"}
    line = refusal(capsys, [a.format(**paths) for a in argv])
    assert line.startswith(f"python -m fbi {argv[0]}: ")
    for name in names:
        assert name in line
    assert not (tmp_path / "out").exists()


def test_a_refusal_has_no_traceback_from_the_command_line(models, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "fbi", "export", str(models / "bitnet"),
                           "--format", "hf", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_context_beyond_training_warns_and_exports_are_readable(models, tmp_path, capsys, caplog):
    main(["eval", str(models / "fbi"), "--text", TEXT, "--context", "64", "--max-tokens", "100"])
    assert json.loads(capsys.readouterr().out)["ppl/test.txt"]["context"] == 64
    assert any("--context 64 is longer than the 32 tokens" in r.message for r in caplog.records)

    for fmt in ("packed", "hf"):
        main(["export", str(models / "fbi"), "--format", fmt, "--out", str(tmp_path / fmt)])
        for f in (tmp_path / fmt).iterdir():
            assert f.stat().st_mode & stat.S_IROTH, f"{f} is not readable by others"
