"""Packed exports on the packed kernels, as ``python -m fbi eval|generate|lm-eval`` load them:
the logits of the dense (unpacked, bit-identical) model to fp32 rounding for every scheme and
both architectures; the same greedy tokens, generated with the key-value cache (llama) or the
recurrent state (mamba2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fbi.binarize import SCHEMES
from fbi.export.packed import UnpackedLinear, export_packed
from fbi.generate import cached_model, generate_ids
from fbi.kernels.linear import PackedLinear
from fbi.kernels.stored import StoredEmbedding, StoredHead
from fbi.trained import load
from fbi_testing import REPO

sys.path.insert(0, str(REPO / "tests" / "export"))
from test_packed import tiny_trained  # noqa: E402

SIGN_PRODUCT_SCHEMES = sorted(set(SCHEMES) - {"fp", "pbllm"})


def exported(tmp_path, tokenizer_dir, scheme, arch="llama", fp_dtype="float32"):
    trained = tiny_trained(scheme, tokenizer_dir, arch=arch)
    export_packed(trained, tmp_path / "packed", fp_dtype=fp_dtype)
    return tmp_path / "packed"


@pytest.mark.parametrize("scheme,arch", [(s, "llama") for s in SIGN_PRODUCT_SCHEMES]
                         + [(s, "mamba2") for s in ("fbi", "bitnet", "bitnet158", "onebit")])
def test_packed_kernels_give_the_dense_logits(tmp_path, tokenizer_dir, scheme, arch):
    path = exported(tmp_path, tokenizer_dir, scheme, arch)
    dense, packed = load(path, kernel="dense"), load(path)
    layers = [m for m in packed.model.modules() if isinstance(m, (PackedLinear, UnpackedLinear))]
    assert layers and all(isinstance(m, PackedLinear) for m in layers)
    ids = torch.randint(0, packed.model_cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want, got = dense.logits(ids), packed.logits(ids)
    err = (got - want).abs() / want.abs().max()
    if SCHEMES[scheme].QUANTIZES_ACTIVATIONS:
        # Another summation order moves a pre-quantization value by an ulp, which now and then
        # crosses a rounding step of the input quantizer (8-bit absmax): that position, and the
        # later ones attending to it, move by the step's effect; the rest agree to fp32 rounding.
        per_position = err.amax(-1).flatten()
        assert float(per_position.median()) < 1e-4 and float(err.max()) < 1e-2, per_position
    else:
        assert float(err.max()) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "mamba2"])
def test_head_and_embeddings_run_as_stored(tmp_path, tokenizer_dir, arch):
    """A bf16 export (the default) keeps its head and embeddings in bf16 on the kernels, a tied
    pair as one tensor, in the transformers twin too; the logits are the dense path's (the
    same bf16 values widened to fp32) to fp32 rounding, in decode's and prefill's shapes."""
    path = exported(tmp_path, tokenizer_dir, "fbi", arch, fp_dtype="bfloat16")
    dense, packed = load(path, kernel="dense"), load(path)
    head = packed.model.lm_head
    embeddings = [m for m in packed.model.modules() if isinstance(m, torch.nn.Embedding)]
    assert isinstance(head, StoredHead) and head.weight.dtype == torch.bfloat16
    assert len(embeddings) == 1 and isinstance(embeddings[0], StoredEmbedding)
    assert embeddings[0].weight.dtype == torch.bfloat16
    shared = head.weight.data_ptr() == embeddings[0].weight.data_ptr()
    assert shared == packed.model_cfg.tie_embeddings
    assert dense.model.lm_head.weight.dtype == torch.float32
    for n in (1, 40):  # the bf16 kernel and prefill's widened blocks (n >= cpu.PREFILL_TOKENS)
        ids = torch.randint(0, packed.model_cfg.vocab_size, (1, n))
        with torch.no_grad():
            want, got = dense.logits(ids), packed.logits(ids)
        assert got.dtype == torch.float32
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    twin = cached_model(packed)
    assert twin.get_input_embeddings() is embeddings[0]
    # Mamba2ForCausalLM casts the head's input to the head's dtype: its twin's head is fp32
    assert (twin.lm_head is head) == (arch == "llama")
    ids = torch.randint(0, packed.model_cfg.vocab_size, (1, 40))
    with torch.no_grad():
        want, got = cached_model(dense)(ids).logits, twin(ids).logits
        step = twin(ids[:, :1]).logits  # decode's shape through the twin
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert float((step[0, 0] - want[0, 0]).abs().max() / want.abs().max()) < 1e-4


def test_pbllm_runs_dense_with_a_warning(tmp_path, tokenizer_dir, caplog):
    path = exported(tmp_path, tokenizer_dir, "pbllm")
    packed = load(path)
    assert not any(isinstance(m, PackedLinear) for m in packed.model.modules())
    assert "pbllm" in caplog.text and "--kernel dense" in caplog.text


@pytest.mark.parametrize("scheme,arch,fp_dtype", [
    ("fbi", "llama", "float32"), ("bitnet", "llama", "float32"), ("bitnet158", "llama", "float32"),
    ("fbi", "mamba2", "float32"), ("fbi", "llama", "bfloat16"), ("fbi", "mamba2", "bfloat16")])
def test_packed_generation_equals_dense_token_for_token(tmp_path, tokenizer_dir, scheme, arch,
                                                        fp_dtype):
    path = exported(tmp_path, tokenizer_dir, scheme, arch, fp_dtype)
    dense, packed = load(path, kernel="dense"), load(path)
    prompt = [dense.start_id] + dense.tokenizer.encode(["The history of the"])[0]
    n = dense.max_length - len(prompt)
    model = cached_model(packed)  # activation quantizers too: their layers are not folded
    assert model is not None and type(model).__name__ in ("LlamaForCausalLM", "Mamba2ForCausalLM")
    assert not any(p.is_meta for p in model.parameters())
    assert generate_ids(packed, prompt, n, model=model) == generate_ids(
        dense, prompt, n, model=cached_model(dense))


def test_cli_kernel_flag(tmp_path, tokenizer_dir):
    path = exported(tmp_path, tokenizer_dir, "fbi")

    def generate(*flags):
        out = subprocess.run([sys.executable, "-m", "fbi", "generate", str(path), "--prompt",
                              "The history", "--temperature", "0", "--max-new-tokens", "6", *flags],
                             cwd=REPO, capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["samples"]

    assert generate() == generate("--kernel", "dense") == generate("--kernel", "packed")


def test_kernel_packed_on_a_run_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")  # found as an HF checkpoint, not loaded
    with pytest.raises(ValueError, match="--kernel packed: .* not a packed export"):
        load(tmp_path, kernel="packed")


def test_lm_eval_model_args_choose_the_kernel(tmp_path, tokenizer_dir):
    from fbi.eval.harness import FbiLM

    path = exported(tmp_path, tokenizer_dir, "fbi")

    def on_kernels(**kw):
        model = FbiLM(path=str(path), device="cpu", **kw).trained.model
        return any(isinstance(m, PackedLinear) for m in model.modules())

    assert on_kernels() and on_kernels(kernel="packed") and not on_kernels(kernel="dense")
