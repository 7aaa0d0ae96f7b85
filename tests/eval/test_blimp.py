"""BLiMP minimal pairs: the bundled subset, and sentence log-probabilities against transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fbi.data.tokenizer import load_tokenizer
from fbi.eval.blimp import blimp_accuracy, read_pairs
from fbi.eval.likelihood import continuation_logprobs
from fbi_testing import REPO

BLIMP = REPO / "data" / "blimp"


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def reference_logprob(model, ids: list[int], n_scored: int) -> float:
    labels = torch.tensor([ids])
    labels[:, : len(ids) - n_scored] = -100
    with torch.no_grad():
        return -model(torch.tensor([ids]), labels=labels).loss.double().item() * n_scored


def test_bundled_subset_has_every_phenomenon():
    files = sorted(BLIMP.glob("*.jsonl"))
    assert len(files) == 67
    pairs = read_pairs([BLIMP])
    assert len(pairs) == 67 * 30
    assert len({p["UID"] for p in pairs}) == 67
    assert all(p["sentence_good"] != p["sentence_bad"] for p in pairs)


def test_padded_batches_score_like_single_sequences(llama):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 2)]
    n_scored = [2, 4, 4, 11, 1]
    ours, greedy = continuation_logprobs(lambda x: llama(x).logits, seqs, n_scored, batch_size=3)
    for s, k, got in zip(seqs, n_scored, ours):
        assert got == pytest.approx(reference_logprob(llama, s, k), rel=1e-5)
    for s, k, g_ in zip(seqs, n_scored, greedy):
        with torch.no_grad():
            pred = llama(torch.tensor([s])).logits[0, len(s) - k - 1: -1].argmax(-1)
        assert g_ == (pred.tolist() == s[len(s) - k:])


def test_accuracy_counts_pairs_whose_good_sentence_is_likelier(llama, tokenizer_dir, tmp_path):
    tok = load_tokenizer(str(tokenizer_dir))
    lines = (BLIMP / "determiner_noun_agreement_1.jsonl").read_text().splitlines()[:12]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    pairs = read_pairs([tmp_path / "pairs.jsonl"])
    result = blimp_accuracy(lambda x: llama(x).logits, tok, tok.eos_id, pairs, batch_size=5)
    expected = []
    for p in pairs:
        good, bad = ([tok.eos_id] + tok.encode([p[k]])[0] for k in ("sentence_good", "sentence_bad"))
        expected.append(reference_logprob(llama, good, len(good) - 1)
                        > reference_logprob(llama, bad, len(bad) - 1))
    assert result["accuracy"] == sum(expected) / len(expected)
    assert result["pairs"] == 12
    assert result["groups"]["UID/determiner_noun_agreement_1"] == result["accuracy"]


def test_files_without_pairs_are_refused(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "no pair"}))
    with pytest.raises(ValueError, match="sentence_good"):
        read_pairs([tmp_path / "x.jsonl"])
