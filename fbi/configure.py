"""The configuration with every registry's schemas: architectures and schemes own their
dataclasses, ``fbi.config`` composes what it is handed, and this module is the one that hands
it both (so that neither the config module nor the registries import each other)."""

from __future__ import annotations

from omegaconf import DictConfig

from fbi import config
from fbi.binarize import SCHEME_CONFIGS, SIGN_ONLY
from fbi.config import TrainConfig
from fbi.models import MODEL_CONFIGS

REGISTRIES = config.Registries(models=MODEL_CONFIGS, schemes=SCHEME_CONFIGS, sign_only=SIGN_ONLY)


def validate(cfg: DictConfig) -> TrainConfig:
    """``fbi.config.validate`` with the registered architectures and schemes."""
    return config.validate(cfg, REGISTRIES)


def compose(overrides: list[str]) -> TrainConfig:
    """The validated config ``train.py`` would run with these overrides."""
    return config.compose(overrides, REGISTRIES)
