"""Every verb of python -m fbi against a table of bad arguments and damaged inputs: exit 2,
one paragraph naming the file or argument, no traceback, and every file around unchanged
(hashes before and after). Then what the verbs must do right: an export never writes into a
run or over what it did not write, re-exports replace an export whole, eval shows progress,
lm-eval's adapter refuses typos."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import pytest
import torch
from omegaconf import OmegaConf

from fbi.cli import main
from fbi.configure import compose
from fbi.data.tokenizer import load_tokenizer
from fbi.export.hf import export_hf
from fbi.export.packed import export_packed
from fbi.models import build_model
from fbi_testing import REPO, WIKITEXT

sys.path.insert(0, str(REPO / "tests" / "export"))
from test_packed import tiny_trained  # noqa: E402

TEXT = str(WIKITEXT / "test.txt")


def make_run(run, tokenizer_dir) -> None:
    """A run directory as train.py leaves it (stage 0: rank 0 saved the whole model)."""
    tok = load_tokenizer(str(tokenizer_dir))
    cfg = compose(["experiment=demo", "teacher=none", f"tokenizer.path={tokenizer_dir}",
                   f"run_dir={run}", "model.n_layers=2", "model.d_model=64", "model.d_ff=96",
                   f"model.vocab_size={tok.vocab_size}", "data.seq_len=32"])
    step = run / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"module": build_model(cfg.model, cfg.scheme).state_dict()},
               step / "mp_rank_00_model_states.pt")
    (step / "complete.json").write_text(json.dumps({"step": 2, "consumed": 8}))
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    (run / "tokenizer.json").write_text(json.dumps({
        "source": tok.source, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 6.0, "ce": 6.0}) + "\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("verbs")
    make_run(root / "run", tokenizer_dir)
    for name in ("run_cut", "run_empty"):
        shutil.copytree(root / "run", root / name)
    pt = root / "run_cut" / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    (root / "run_empty" / "metrics.jsonl").write_text("")
    trained = tiny_trained("fbi", tokenizer_dir)
    export_packed(trained, root / "packed")
    export_hf(trained, root / "hf")
    for name in ("packed", "hf"):
        shutil.copytree(root / name, root / f"{name}_noweights")
        (root / f"{name}_noweights" / "model.safetensors").unlink()
        shutil.copytree(root / name, root / f"{name}_badjson")
    (root / "packed_badjson" / "fbi_packed.json").write_text('{"format": "fbi-packed",\n')
    (root / "hf_badjson" / "config.json").write_text('{"model_type": "llama",\n')
    (root / "shards").mkdir()
    (root / "shards" / "manifest.json").write_text("{}")
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("mine")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02text")
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (root / "empty.txt").write_text("\n\n")
    (root / "pairs.jsonl").write_text(json.dumps({"good": "a", "bad": "b"}) + "\n")
    return root


def hashes(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


TABLE = [
    # export never writes into a run, an export of the other format, shards or foreign files
    (["export", "{run}", "--format", "packed", "--out", "{run}"],
     ["--out", "the run directory", "training run", "exports/NAME"]),
    (["export", "{packed}", "--format", "packed", "--out", "{run}/exports/p"],
     ["is inside the run directory", "{run}"]),
    (["export", "{run}", "--format", "hf", "--out", "{packed}"],
     ["{packed} holds a packed export", "--format hf"]),
    (["export", "{run}", "--format", "packed", "--out", "{hf}"], ["holds a Hugging Face export"]),
    (["export", "{run}", "--format", "packed", "--out", "{shards}"], ["token shards"]),
    (["export", "{run}", "--format", "packed", "--out", "{notes}"], ["notes.txt"]),
    (["export", "{packed}", "--format", "packed", "--out", "{packed}"],
     ["is the model being exported"]),
    (["export", "{run}", "--format", "packed", "--out", "{root}/binary.txt"], ["is a file"]),
    (["export", "{run_cut}", "--format", "packed", "--out", "{tmp}/o"],
     ["checkpoint step_00000002", "cannot be read", "--tag"]),
    # damaged models: named, with the fix
    (["generate", "{hf_noweights}", "--prompt", "x"], ["{hf_noweights} has no weights"]),
    (["eval", "{packed_noweights}", "--text", TEXT], ["{packed_noweights} has no model.safetensors"]),
    (["eval", "{packed_badjson}", "--text", TEXT], ["{packed_badjson}/fbi_packed.json is not valid JSON"]),
    (["generate", "{hf_badjson}", "--prompt", "x"], ["{hf_badjson}/config.json is not valid JSON"]),
    # eval's inputs, checked before the model loads
    (["eval", "{packed}", "--text", "{root}/binary.txt"], ["--text", "binary.txt", "not UTF-8", "NUL"]),
    (["eval", "{packed}", "--text", "{root}/latin1.txt"], ["--text", "latin1.txt", "not UTF-8"]),
    (["eval", "{packed}", "--text", "{root}/empty.txt"], ["--text", "empty.txt", "holds no text"]),
    (["eval", "{packed}", "--blimp", "{root}/pairs.jsonl"], ["pairs.jsonl line 1", "sentence_good"]),
    # report
    (["report", "{run}", "--out", "{tmp}/no/such/dir/r.png"], ["--out", "does not exist"]),
    (["report", "{run_empty}"], ["run_empty", "holds no training step"]),
    # data
    (["data", "verify", "{tmp}/nowhere"], ["nowhere is not a folder"]),
]


@pytest.mark.parametrize("argv,names", TABLE)
def test_a_bad_argument_or_damaged_input_is_one_paragraph_and_changes_nothing(
        root, tmp_path, capsys, argv, names):
    paths = {name: root / name for name in ("run", "run_cut", "run_empty", "packed", "hf",
                                            "packed_noweights", "hf_noweights", "packed_badjson",
                                            "hf_badjson", "shards", "notes")}
    paths.update(root=root, tmp=tmp_path)
    before = hashes(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([a.format(**paths) for a in argv])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m fbi {argv[0]}: ")
    for name in names:
        assert name.format(**paths) in lines[0], lines[0]
    assert hashes(root) == before
    assert not (tmp_path / "o").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no half-written export


@pytest.mark.parametrize("argv", [
    ["generate", "{packed}"],  # --prompt missing
    ["eval", "{packed}", "--text", TEXT, "--context", "abc"],
    ["export", "{packed}", "--format", "zip", "--out", "x"],
    ["no-such-verb"],
])
def test_argparse_errors_exit_2_without_a_traceback(root, capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main([a.format(packed=root / "packed") for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and "error:" in err


def test_export_replaces_an_earlier_export_whole_and_honours_tag(root, tmp_path, capsys):
    out = tmp_path / "exp"
    main(["export", str(root / "run"), "--tag", "step_00000002", "--format", "packed",
          "--out", str(out)])
    first = hashes(out)
    assert (out / "fbi_packed.json").exists()
    assert "--tag step_00000002" in (out / "README.md").read_text()
    main(["export", str(root / "run"), "--format", "packed", "--fp-dtype", "float32",
          "--out", str(out)])
    second = hashes(out)
    assert second.keys() == first.keys() and second != first
    assert json.loads((out / "fbi_packed.json").read_text())["fp_dtype"] == "float32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_run_written_into_by_an_old_export_is_refused_not_misread(root, tmp_path, capsys):
    """The issue's damaged run: a packed export written into it made fbi read it as an export
    and ignore --tag."""
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    for name in ("fbi_packed.json", "model.safetensors"):
        shutil.copy(root / "packed" / name, run / name)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", str(run), "--tag", "step_00000002", "--text", TEXT])
    assert "holds both a run (config.yaml) and a packed export" in capsys.readouterr().err


def test_eval_shows_progress(root, caplog):
    with caplog.at_level("INFO"):
        main(["eval", str(root / "packed"), "--text", TEXT, "--max-tokens", "200",
              "--context", "32"])
    lines = [r.message for r in caplog.records if r.name == "fbi.progress"]
    assert lines and "perplexity of test.txt: 7/7 windows (100%)" in lines[-1], lines
    assert "s left" in lines[-1]


@pytest.mark.parametrize("args,message", [
    ("path={packed},no_such_arg=1", "no_such_arg not understood by --model fbi"),
    ("path={packed},batch_size=abc", "batch_size: got 'abc'"),
    ("tag=x", "name the model, path="),
])
def test_lm_eval_adapter_refuses_typos(root, args, message):
    from fbi.config import ConfigError
    from fbi.eval.harness import FbiLM

    with pytest.raises(ConfigError, match=message):
        FbiLM.create_from_arg_string(args.format(packed=root / "packed"), {"batch_size": 1})


def test_model_cards_say_what_is_stored(root):
    """The HF card's weights are folded (not "fbi layers"); the packed card names the dtype
    of its full-precision parts."""
    hf = (root / "hf" / "README.md").read_text()
    assert "# LlamaForCausalLM folded from an fbi model trained with the fbi scheme" in hf
    assert "with fbi layers" not in hf and "folded into dense float32 weights" in hf
    packed = (root / "packed" / "README.md").read_text()
    assert "the full-precision parts (embeddings, norms, output head) in bfloat16" in packed


@pytest.mark.slow  # lm-eval indexes its task registry: a minute on a loaded machine
@pytest.mark.parametrize("argv,names", [
    (["--model", "fbi", "--model_args", "path={tmp}/nowhere", "--tasks", "blimp_only_npi_scope"],
     ["MODEL", "nowhere", "is not a folder"]),
    (["--model", "fbi", "--model_args", "path={packed}", "--tasks", "no_such_task"],
     ["no_such_task"]),
])
def test_lm_eval_errors_are_one_paragraph(root, tmp_path, capsys, argv, names):
    """lm-eval's own errors and fbi's through lm-eval: the same boundary (these were a
    traceback of lm-eval's and a 39-line one of fbi's)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["lm-eval", *(a.format(tmp=tmp_path, packed=root / "packed") for a in argv)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line
             and "WARNING" not in line]
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("python -m fbi lm-eval: ")
    for name in names:
        assert name in lines[-1]
