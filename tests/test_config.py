"""Recipes and configuration choices: schedules in tokens, weight-decay groups, gradient
dtypes, the demo-versus-model choice, and refusing another model's run directory."""

import math

import pytest

from fbi.config import CONF_DIR, ConfigError, check_experiment
from fbi.configure import compose
from fbi.deepspeed_setup import deepspeed_config, lr_lambda, param_groups
from fbi.models import build_model
from fbi.checkpoint import check_same_config

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
        compose([f"experiment={recipe}", *NEEDS, "zero=stage0", "zero.gather_signs=false"])


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
    check_same_config(demo, tmp_path)  # the same model resumes
    other = compose(["experiment=demo", "model.n_layers=6"])
    with pytest.raises(ConfigError, match=r"model.n_layers=4 \(now 6\)"):
        check_same_config(other, tmp_path)
    with pytest.raises(ConfigError, match="scheme.name=fbi"):
        check_same_config(compose(["experiment=demo", "scheme=fp"]), tmp_path)


def test_a_resume_may_change_only_the_resumable_fields(tmp_path):
    from omegaconf import OmegaConf

    demo = compose(["experiment=demo"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(demo)))
    check_same_config(compose([
        "experiment=demo", "max_steps=5000", "micro_batch_size=4", "logging.log_every=1",
        "zero.overlap_comm=true", "distributed.timeout_s=60", f"run_dir={tmp_path}/moved",
        "checkpoint_every=7", "teacher.path=/moved/teacher"]), tmp_path)
    with pytest.raises(ConfigError, match=r"^optim: .* optim.lr=0.003 \(now 0.002\), "
                       r"seed=0 \(now 3\), zero.stage=0 \(now 2\);"):
        check_same_config(compose(["experiment=demo", "optim.lr=2e-3", "seed=3", "zero=stage2"]),
                          tmp_path)


# Bi-Mamba's train_bimamba.py (tangshengku/bi-mamba): 360 Amber chunks of 1,706,976 sequences
# of 2048 tokens, 256 sequences per optimizer step (GPUs x per-device batch x accumulation).
BIMAMBA_STEPS = 360 * 1_706_976 // 256


@pytest.mark.parametrize("recipe,size", [("bimamba_780m", 780e6), ("bimamba_1p3b", 1.3e9),
                                         ("bimamba_2p7b", 2.7e9)])
def test_bimamba_recipes_compose_to_the_references_lr_batch_and_schedule(recipe, size):
    """Built on the meta device with the Mamba-2 tokenizer's 50,280 tokens: the published
    sizes, only in_proj/out_proj binary; AdamW lr 2.5e-4 warmed up over 2000 steps then cosine
    to 2.5e-5 at the end of one pass over Amber, 256 sequences per step, weight decay 0.1 on
    every parameter, bf16 autocast over fp32 parameters, the residual stream in fp32."""
    import torch

    from fbi.binarize.fbi import FBILinear

    cfg = compose([f"experiment={recipe}", *NEEDS, "model.vocab_size=50280"])
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.scheme)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(size, rel=0.04)
    binary = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, FBILinear)}
    assert binary == {"in_proj", "out_proj"}
    assert (cfg.global_batch_size, cfg.data.seq_len) == (256, 2048)
    assert cfg.schedule_steps() == cfg.max_steps == BIMAMBA_STEPS
    assert cfg.train_tokens == 360 * 1_706_976 * 2048
    lr, floor, warmup = cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps
    assert (lr, floor, warmup) == (2.5e-4, 2.5e-5, 2000)
    factor = lr_lambda(cfg)
    for step in (1000, 100_000, 1_200_000, 2_300_000):  # the reference's warmup, then cosine
        expected = (lr * step / warmup if step < warmup else floor + (lr - floor) * 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / (BIMAMBA_STEPS - warmup))))
        assert lr * factor(step) == pytest.approx(expected, rel=2e-3 if step < warmup else 1e-12)
    assert (cfg.optim.weight_decay, cfg.optim.decay) == (0.1, "all")
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.grad_clip) == (0.9, 0.95, 1.0)
    assert cfg.precision == "bf16_mixed" and cfg.model.residual_in_fp32
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not ds["bf16"]["enabled"] and "data_types" not in ds


def test_all_but_ssm_exempts_what_mamba_ssm_marks():
    """optim.decay=all_but_ssm: Mamba's own exemption (A_log, D, dt_bias), everything else
    decayed; the recipes' ``all`` decays them too, as the reference does."""
    cfg = compose(["experiment=bimamba_demo", "model.vocab_size=64", "model.n_layers=2",
                   "optim.decay=all_but_ssm"])
    model = build_model(cfg.model, cfg.scheme)
    decayed, kept = param_groups(model, 0.1, "all_but_ssm")
    exempt = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters()
              if any(p is q for q in kept["params"])}
    assert exempt == {"A_log", "D", "dt_bias"} and kept["weight_decay"] == 0.0
    assert count([decayed]) == [sum(p.numel() for p in model.parameters()) - count([kept])[0]]
    assert count(param_groups(model, 0.1, "all")) == [sum(p.numel() for p in model.parameters())]


@pytest.mark.parametrize("seed", [-1, -7])
def test_a_negative_seed_is_refused_naming_the_field(seed):
    with pytest.raises(ConfigError, match="seed: got -"):
        compose(["experiment=demo", f"seed={seed}"])


def test_train_py_refuses_a_negative_seed_before_the_run_directory_exists(tmp_path):
    from fbi_testing import run_train

    proc = run_train(["experiment=demo", "seed=-1", f"run_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2 and "seed: got -1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


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
