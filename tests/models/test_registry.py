"""The architecture registry: real module paths reach the linear factory, default binarize
patterns per architecture, model config chosen by model.arch, HF round trip of a binary model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fbi.binarize import SCHEMES, linear_factory
from fbi.binarize.fp import DenseLinear
from fbi.config import ConfigError, SchemeConfig
from fbi.configure import compose
from fbi.models.llama import ModelConfig
from fbi.models.mamba2 import Mamba2Config
from fbi.models import ARCHITECTURES, architecture, from_hf, to_hf

TINY = {
    "llama": ModelConfig(n_layers=2, d_model=32, d_ff=64, n_heads=4, vocab_size=50),
    "mamba2": Mamba2Config(n_layers=2, d_model=32, d_state=8, head_dim=16, chunk_size=8,
                           vocab_size=50),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_factory_receives_the_real_module_paths(arch):
    names = []
    make = linear_factory("fbi", ["*"])

    def recording(name, *args):
        names.append(name)
        return make(name, *args)

    model = ARCHITECTURES[arch].build(TINY[arch], recording)
    assert sorted(names) == sorted(n for n, m in model.named_modules() if isinstance(m, DenseLinear))


def test_default_patterns_binarize_the_blocks_of_llama_and_in_out_proj_of_mamba():
    from fbi.models import build_model

    binary = {arch: sorted(n for n, m in build_model(TINY[arch], SchemeConfig()).named_modules()
                           if isinstance(m, DenseLinear) and type(m) is not DenseLinear)
              for arch in TINY}
    assert len(binary["llama"]) == 14 and all(n.startswith("model.layers.") for n in binary["llama"])
    assert binary["mamba2"] == [f"backbone.layers.{i}.mixer.{p}" for i in range(2)
                                for p in ("in_proj", "out_proj")]


def test_model_arch_chooses_the_schema_and_names_bad_fields():
    cfg = compose(["experiment=none", "max_steps=1", "model=bimamba_tiny"])
    assert isinstance(cfg.model, Mamba2Config) and cfg.model.tie_embeddings
    assert isinstance(compose(["experiment=none", "max_steps=1"]).model, ModelConfig)
    with pytest.raises(ConfigError, match="model.arch"):
        compose(["experiment=none", "max_steps=1", "model.arch=rwkv"])
    with pytest.raises(ConfigError, match="d_ff"):  # a transformer field on Mamba-2
        compose(["experiment=none", "max_steps=1", "model=bimamba_tiny", "+model.d_ff=64"])
    with pytest.raises(ConfigError, match="model.head_dim"):
        compose(["experiment=none", "max_steps=1", "model=bimamba_tiny", "model.head_dim=7"])


FOLDABLE = sorted(n for n, layer in SCHEMES.items() if not layer.fold_refusal())


@pytest.mark.parametrize("scheme", FOLDABLE)
def test_binary_llama_folds_into_transformers(scheme):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    cfg, ours = from_hf(hf, scheme)
    assert architecture(cfg) is ARCHITECTURES["llama"]
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(to_hf(ours.eval(), cfg)(ids).logits, ours(ids),
                                   rtol=1e-5, atol=1e-5)
