"""Architectures. Each knows nothing of schemes beyond asking the factory for a linear."""

from fbi.binarize import linear_factory
from fbi.config import ModelConfig, SchemeConfig
from fbi.models.llama import LlamaLM

ARCHITECTURES = {"llama": LlamaLM}


def build_model(cfg: ModelConfig, scheme: "str | SchemeConfig", binarize: list[str]) -> LlamaLM:
    return ARCHITECTURES[cfg.arch](cfg, linear_factory(scheme, binarize))
