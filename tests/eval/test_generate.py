"""Generation: with the key-value cache of the folded transformers twin, the same greedy tokens
as re-running the whole window for every token; stopped at the first stop string."""

from __future__ import annotations

import sys

import pytest

from fbi.generate import cached_model, generate_ids
from fbi_testing import REPO

sys.path.insert(0, str(REPO / "tests" / "export"))
from test_packed import tiny_trained  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "mamba2"])
def test_cache_gives_the_windowed_greedy_tokens(tokenizer_dir, arch):
    trained = tiny_trained("fbi", tokenizer_dir, arch=arch)
    prompt = [trained.start_id] + trained.tokenizer.encode(["The history of the"])[0]
    n = trained.max_length - len(prompt)  # inside the trained context: the same window
    model = cached_model(trained)
    assert model is not None and model is not trained.model
    windowed = generate_ids(trained, prompt, n)
    cached = generate_ids(trained, prompt, n, model=model)
    assert cached == windowed
    assert len(cached) == n or cached[-1] == trained.tokenizer.eos_id


def test_schemes_that_cannot_fold_generate_without_a_cache(tokenizer_dir):
    assert cached_model(tiny_trained("bitnet", tokenizer_dir)) is None


@pytest.mark.parametrize("scheme", ["fbi", "bitnet"])
def test_generation_stops_at_the_first_stop_string(tokenizer_dir, scheme):
    trained = tiny_trained(scheme, tokenizer_dir)
    model = cached_model(trained)
    prompt = [trained.start_id] + trained.tokenizer.encode(["The history of"])[0]
    full = generate_ids(trained, prompt, 20, model=model)
    decode = trained.tokenizer.decode
    k = next(i for i in range(3, len(full)) if decode(full[:i]).strip())
    stop = decode(full[:k])[-2:]  # a string that first appears at token k (or before)
    first = next(i for i in range(1, len(full) + 1) if stop in decode(full[:i]))
    stopped = generate_ids(trained, prompt, 20, stop=[stop], model=model)
    assert stopped == full[:first] and len(stopped) < len(full)


def plain_transformers_windowed_greedy(hf, prompt: list[int], n: int, context: int,
                                       eos: int) -> list[int]:
    """The reference: transformers' model called without a cache on the last ``context``
    tokens for each new token (what a sliding window means), argmax."""
    import torch

    ids = list(prompt)[-context:]
    start = len(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([ids[-context:]]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
            if ids[-1] == eos:
                break
    return ids[start:]


@pytest.mark.parametrize("arch,prompt_words,new", [
    ("llama", 3, 40),  # an output longer than the context
    ("llama", 60, 8),  # a prompt longer than the context
    ("mamba2", 60, 3),  # Mamba has no positions, but trained on 32 tokens: the same window
])
def test_past_the_context_cached_equals_uncached_and_plain_transformers(
        tokenizer_dir, arch, prompt_words, new, caplog):
    """Prompts and outputs longer than the trained context (32 tokens here): the cached path,
    the windowed path and a plain transformers no-cache decode of the folded twin give the
    same tokens, and the user is warned once the context is passed."""
    from fbi.export.hf import to_transformers
    from fbi.generate import warn_past_context

    warn_past_context.cache_clear()  # said once per process
    trained = tiny_trained("fbi", tokenizer_dir, arch=arch)
    text = " ".join(["the history of the world"] * prompt_words)
    prompt = [trained.start_id] + trained.tokenizer.encode([text])[0][: prompt_words * 2]
    context = trained.max_length
    assert len(prompt) + new > context
    reference = plain_transformers_windowed_greedy(to_transformers(trained), prompt, new, context,
                                                   trained.tokenizer.eos_id)
    cached = generate_ids(trained, prompt, new, model=cached_model(trained))
    windowed = generate_ids(trained, prompt, new)
    assert cached == reference
    assert windowed == reference
    assert len(cached) == new or cached[-1] == trained.tokenizer.eos_id
    assert any(f"past the {context}-token context" in r.message for r in caplog.records)
