"""Recipes and configuration choices: schedules in tokens, weight-decay groups, gradient
dtypes, the demo-versus-model choice, and refusing another model's run directory."""

import math

import pytest

from fbi.config import CONF_DIR, ConfigError, check_experiment
from fbi.configure import compose
from fbi.deepspeed_setup import deepspeed_config, lr_lambda, param_groups
from fbi.models import build_model
from fbi.checkpoint import check_same_student

# FBI-LLM (Ma et al., 2024), Table 1: optimizer steps and sequences of 2048 tokens per step.
PAPER = {"fbi_130m": (600_075, 1024), "fbi_1p3b": (533_430, 1152), "fbi_7b": (320_040, 1920)}
NEEDS = ["teacher.path=/models/teacher", "data.shards_dir=/shards/amber"]


@pytest.mark.parametrize("recipe", sorted(PAPER))
def test_paper_schedule_ends_where_the_paper_does(recipe):
    steps, batch = PAPER[recipe]
    cfg = compose([f"experiment={recipe}", *NEEDS])
    assert (cfg.global_batch_size, cfg.data.seq_len) == (batch, 2048)
    assert cfg.schedule_steps() == cfg.max_steps == steps
    assert cfg.train_tokens == pytest.approx(steps * batch * 2048, rel=1e-4)
    factor = lr_lambda(cfg)
    warmup, lr, floor = cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.min_lr
    assert (warmup, lr, floor) == (2000, 3e-4, 3e-5)
    for share in (0.1, 0.5, 0.9):
        step = int(share * steps)
        cosine = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        assert lr * factor(step) == pytest.approx(cosine, rel=1e-12)
    assert lr * factor(steps) == pytest.approx(floor)
    # Another global batch keeps the token budget, hence the schedule's length in tokens.
    doubled = compose([f"experiment={recipe}", *NEEDS, f"global_batch_size={2 * batch}"])
    assert doubled.schedule_steps() == math.ceil(cfg.train_tokens / (2 * batch * 2048))
    # max_steps stops a run early without moving the schedule.
    smoke = compose([f"experiment={recipe}", *NEEDS, "max_steps=10"])
    assert smoke.max_steps == 10 and smoke.schedule_steps() == steps


@pytest.mark.parametrize("recipe", sorted(PAPER))
def test_recipes_accumulate_and_reduce_bf16_gradients_in_fp32(recipe):
    cfg = compose([f"experiment={recipe}", *NEEDS])
    ds = deepspeed_config(cfg, world_size=32)
    assert cfg.precision == "bf16" and ds["bf16"]["enabled"]
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"
    assert "data_types" not in deepspeed_config(compose(["experiment=demo"]), 1)
    with pytest.raises(ConfigError, match="zero.grad_dtype"):
        compose([f"experiment={recipe}", *NEEDS, "zero=stage0"])


def count(groups):
    return [sum(p.numel() for p in g["params"]) for g in groups]


def test_weight_decay_groups_per_recipe():
    """The paper's recipes decay every parameter; the default decays only matrices."""
    tiny = ["model=fbi_tiny", "model.vocab_size=64", "model.n_layers=2"]
    for recipe, expected in [("fbi_130m", "all"), ("demo", "matrices")]:
        cfg = compose([f"experiment={recipe}", *NEEDS, *tiny])
        assert cfg.optim.decay == expected
        model = build_model(cfg.model, cfg.scheme.name, cfg.scheme.binarize)
        total = sum(p.numel() for p in model.parameters())
        matrices = sum(p.numel() for n, p in model.named_parameters()
                       if n.endswith(".weight") and p.dim() == 2)
        groups = param_groups(model, 0.1, cfg.optim.decay)
        if expected == "all":
            assert count(groups) == [total] and groups[0]["weight_decay"] == 0.1
        else:
            assert count(groups) == [matrices, total - matrices]
            assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
            scales = sum(p.numel() for n, p in model.named_parameters()
                         if n.endswith((".alpha", ".beta")))
            norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
            assert scales > 0 and total - matrices == scales + norms


def test_a_named_model_does_not_inherit_the_demo():
    choices = {"experiment": "demo", "model": "fbi_130m"}
    with pytest.raises(ConfigError, match="experiment=demo is a recipe for model=fbi_tiny"):
        check_experiment(CONF_DIR, choices, ["model=fbi_130m"])
    check_experiment(CONF_DIR, choices, ["experiment=demo", "model=fbi_130m"])  # explicit
    check_experiment(CONF_DIR, {"experiment": "demo", "model": "fbi_tiny"}, ["scheme=fp"])
    with pytest.raises(ConfigError, match="no length"):
        compose(["experiment=none", "model=fbi_130m"])


def test_a_run_dir_of_another_model_is_refused(tmp_path):
    from omegaconf import OmegaConf

    demo = compose(["experiment=demo"])
    saved = OmegaConf.structured(demo)
    saved.model.vocab_size = 49152  # filled from the tokenizer when the run started
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    check_same_student(demo, tmp_path)  # the same model resumes
    other = compose(["experiment=demo", "model.n_layers=6"])
    with pytest.raises(ConfigError, match=r"model.n_layers=4 \(now 6\)"):
        check_same_student(other, tmp_path)
    with pytest.raises(ConfigError, match="scheme.name=fbi"):
        check_same_student(compose(["experiment=demo", "scheme=fp"]), tmp_path)


@pytest.mark.parametrize("recipe,size", [("bimamba_780m", 780e6), ("bimamba_1p3b", 1.3e9),
                                         ("bimamba_2p7b", 2.7e9)])
def test_bimamba_recipes_build_the_named_mamba2_size_on_fbi_llms_schedule(recipe, size):
    """Built on the meta device with the Mamba-2 tokenizer's 50,280 tokens: the published
    sizes; only in_proj/out_proj binary; FBI-LLM's one pass over Amber in bf16 with fp32
    gradient accumulation and reduction."""
    import torch

    from fbi.binarize.fbi import FBILinear

    cfg = compose([f"experiment={recipe}", *NEEDS, "model.vocab_size=50280"])
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.scheme)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(size, rel=0.04)
    binary = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, FBILinear)}
    assert binary == {"in_proj", "out_proj"}
    assert cfg.train_tokens == 1_258_448_486_400 and cfg.data.seq_len == 2048
    assert cfg.precision == "bf16" and cfg.zero.grad_dtype == "fp32" and cfg.optim.decay == "all"


@pytest.mark.parametrize("overrides,message", [
    (["zero=stage2"], "zero.gather_signs: gathering signs replaces ZeRO-3's"),
    (["zero=stage3", "scheme=bitnet"], "zero.gather_signs: scheme=bitnet reads more .* fbi, fbi_w1a1, onebit_fold"),
    (["zero=stage3", "zero.offload_params=true"], "zero.gather_signs: not supported with zero.offload_params"),
])
def test_the_one_bit_route_refuses_what_it_cannot_serve(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(["experiment=demo", "zero.gather_signs=true", *overrides])
    compose(["experiment=demo", "zero=stage3", "zero.gather_signs=true"])  # what it serves


def test_stage3_persistence_threshold_reaches_deepspeed():
    cfg = compose(["experiment=demo", "zero=stage3", "zero.param_persistence_threshold=1000"])
    assert deepspeed_config(cfg, 1)["zero_optimization"]["stage3_param_persistence_threshold"] == 1000
