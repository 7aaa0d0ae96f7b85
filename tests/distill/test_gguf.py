import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from fbi.distill import gguf
from fbi_testing import WIKITEXT
from fbi.distill.gguf import SMOLLM2_GGUF_MEMBER, SMOLLM2_REQUIREMENT, gguf_cache_dir, obtain_gguf_teacher

WIKITEXT_TEST = WIKITEXT / "test.txt"
SENTENCE = "The quick brown fox jumps over the lazy dog, and then it rests."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_dir(fbi_cache) -> Path:
    return obtain_gguf_teacher(SMOLLM2_REQUIREMENT, SMOLLM2_GGUF_MEMBER, fbi_cache / "teachers" / "smollm2-135m")


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return LlamaForCausalLM.from_pretrained(teacher_dir).eval(), AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def reference(teacher_dir):
    """The GGUF loaded by transformers, the independent reference for the conversion."""
    gguf_file = gguf_cache_dir(teacher_dir) / SMOLLM2_GGUF_MEMBER
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def test_checkpoint_is_plain_smollm2(teacher_dir, teacher):
    model, _ = teacher
    names = {p.name for p in teacher_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)
    config = model.config
    assert getattr(config, "quantization_config", None) is None
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.vocab_size) == (3, 49152)
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6


def test_logits_match_gguf(teacher, reference):
    (model, tokenizer), (ref_model, ref_tokenizer) = teacher, reference
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tokenizer(SENTENCE, return_tensors="pt").input_ids.tolist()
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits)


def test_tokenizer_round_trips(teacher):
    _, tokenizer = teacher
    ids = tokenizer(SENTENCE).input_ids
    assert len(ids) > 5
    assert tokenizer.decode(ids) == SENTENCE
    assert tokenizer.eos_token == "<|im_end|>"


def test_wikitext2_perplexity(teacher):
    model, tokenizer = teacher
    n_tokens, window = 2048, 512
    ids = tokenizer(WIKITEXT_TEST.read_text(encoding="utf-8")[:20_000]).input_ids
    assert len(ids) >= n_tokens
    ids = torch.tensor(ids[:n_tokens])
    nll, count = 0.0, 0
    with torch.inference_mode():
        for chunk in ids.split(window):
            loss = model(chunk[None], labels=chunk[None]).loss
            nll += loss.item() * (len(chunk) - 1)
            count += len(chunk) - 1
    # Measured 25.5 with these windows (4 x 512, no overlap); bounds are about +-25%.
    assert 19.0 < math.exp(nll / count) < 32.0


def test_second_obtain_uses_no_network(teacher_dir, monkeypatch):
    def unexpected(*args, **kwargs):
        raise AssertionError("a converted teacher must be reused")

    monkeypatch.setattr(gguf, "pip_download", unexpected)
    monkeypatch.setattr(gguf, "convert_gguf", unexpected)
    assert obtain_gguf_teacher(SMOLLM2_REQUIREMENT, SMOLLM2_GGUF_MEMBER, teacher_dir) == teacher_dir
