"""Hugging Face export: a plain LlamaForCausalLM that computes what the fbi model computes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from fbi.binarize import SCHEMES
from fbi.export.hf import CannotFold, export_hf
from fbi.export.packed import export_packed
from fbi.generate import generate_ids
from fbi.trained import load
from fbi_testing import WIKITEXT
from test_packed import tiny_trained

# Runs where fbi cannot be imported (no PYTHONPATH, outside the repository): only transformers.
LOAD_WITHOUT_FBI = """
import importlib.util, sys, torch
assert importlib.util.find_spec("fbi") is None, "fbi is importable"
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.tensor([[tok.eos_token_id] + tok(sys.argv[2], add_special_tokens=False).input_ids])
with torch.no_grad():
    logits = model(ids).logits
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
torch.save({"class": type(model).__name__, "ids": ids, "logits": logits, "greedy": greedy},
           sys.argv[3])
"""


@pytest.mark.parametrize("arch,via_packed", [("llama", False), ("llama", True), ("mamba2", True)])
def test_tied_fbi_model_folds_into_transformers(tmp_path, tokenizer_dir, arch, via_packed):
    trained = tiny_trained("fbi", tokenizer_dir, tie=True, arch=arch)
    source = trained
    if via_packed:  # a packed export converts too
        export_packed(trained, tmp_path / "packed")
        source = load(tmp_path / "packed")
    export_hf(source, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "mamba2": "Mamba2ForCausalLM"}[arch]
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.randint(0, trained.model_cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source.logits(ids))


REFUSED = {n: SCHEMES[n].fold_refusal() for n in sorted(SCHEMES)}


@pytest.mark.parametrize("scheme", [n for n, reason in REFUSED.items() if reason])
def test_schemes_whose_forward_is_not_linear_in_x_are_refused(tmp_path, tokenizer_dir, scheme):
    """Activation quantizers, and OneBit's output LayerNorm (the paper's form)."""
    reason = re.escape(REFUSED[scheme])
    with pytest.raises(CannotFold, match=f"scheme {scheme}: .* {reason}.*--format packed"):
        export_hf(tiny_trained(scheme, tokenizer_dir), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_run_loads_in_transformers_without_fbi(tmp_path, zero3_run, capsys):
    from fbi.cli import main

    main(["export", str(zero3_run), "--format", "hf", "--out", str(tmp_path / "hf")])
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_FBI)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "hf"), "The history of the",
                    str(tmp_path / "out.pt")], cwd=tmp_path, check=True, timeout=300,
                   env={**env, "HF_HUB_OFFLINE": "1"})
    hf = torch.load(tmp_path / "out.pt")
    assert hf["class"] == "LlamaForCausalLM"
    trained = load(zero3_run)
    assert hf["ids"][0, 1:].tolist() == trained.tokenizer.encode(["The history of the"])[0]
    with torch.no_grad():
        torch.testing.assert_close(hf["logits"], trained.logits(hf["ids"]))
    ours = generate_ids(trained, hf["ids"][0].tolist(), 6)  # both stop at EOS
    assert ours[: len(hf["greedy"])] == hf["greedy"].tolist()

    # the eval command measures the export (through transformers) as it measures the run
    ppl = []
    for model in (zero3_run, tmp_path / "hf"):
        capsys.readouterr()
        main(["eval", str(model), "--text", str(WIKITEXT / "test.txt"), "--format", "wikitext",
              "--max-tokens", "300", "--stride", "16"])
        ppl.append(json.loads(capsys.readouterr().out)["ppl/test.txt"])
    assert ppl[0]["tokens"] == ppl[1]["tokens"] == 300
    assert ppl[0]["ppl"] == pytest.approx(ppl[1]["ppl"], rel=1e-5)
