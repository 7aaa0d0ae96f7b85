"""Strided-window perplexity against transformers' own loss on the same windows."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fbi.eval.perplexity import read_text, strided_nll
from fbi_testing import WIKITEXT


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def reference_nll(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide: labels of tokens an earlier window scored are -100,
    and the model's own loss is a mean over the scored labels."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + context, ids.numel())
        window = ids[None, begin:end]
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        scored = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll += model(window, labels=labels).loss.double().item() * scored
        count += scored
        prev_end = end
        if end == ids.numel():
            break
    return nll, count


@pytest.mark.parametrize("context,stride", [(32, 32), (32, 8), (32, 31), (200, 200)])
def test_strided_windows_match_transformers_loss(llama, context, stride):
    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(1))
    ours = strided_nll(lambda x: llama(x).logits, ids, context, stride)
    ref = reference_nll(llama, ids, context, stride)
    assert ours[1] == ref[1]
    assert ours[0] == pytest.approx(ref[0], rel=1e-5)
    if stride < context:
        assert ours[1] == ids.numel() - 1  # every token but the first, once


def test_stride_longer_than_context_is_refused(llama):
    with pytest.raises(ValueError, match="--stride"):
        strided_nll(lambda x: llama(x).logits, torch.arange(50), 16, 17)


def test_wikitext_format_joins_rows_as_the_datasets_library_gives_them(tmp_path):
    import datasets

    sample = tmp_path / "wiki.txt"
    sample.write_text((WIKITEXT / "test.txt").read_text()[:3000])
    rows = datasets.load_dataset("text", data_files=str(sample), split="train",
                                 keep_linebreaks=True, cache_dir=str(tmp_path / "c"))["text"]
    assert read_text(sample, "wikitext") == "\n\n".join(rows)
    assert read_text(sample) == sample.read_text()
