"""Training configuration: Hydra structured configs and validation before any process group.

Every check here runs in the pytest process without torch.distributed; each bad configuration must
raise (and ``torch.distributed`` must still be uninitialised afterwards, i.e. the error came before
any process group).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from dist_attn.train.config import TrainConfig, register_configs, to_train_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
register_configs()


def load(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return to_train_config(cfg)


def test_defaults_compose_and_validate():
    cfg = load()
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.layer_types == "LLLF" and cfg.data.name == "mqar"
    assert validate(cfg, world_size=1).dp == 1
    assert validate(load("parallel.cp=2"), world_size=2).dp == 1
    assert validate(load("parallel.cp=2"), world_size=4).dp == 2  # dp derived
    assert validate(load("parallel=pipeline", "parallel.cp=2"), world_size=8).dp == 2


@pytest.mark.parametrize("preset,params", [("1b", 1.0e9), ("7b", 7.0e9)])
def test_model_presets_have_their_size(preset, params):
    cfg = load(f"model={preset}", "backend=zero1_bf16", "data.seq_len=8192", "data.vocab_size=64")
    assert abs(cfg.model.num_params() / params - 1) < 0.1
    validate(cfg, world_size=8)


@pytest.mark.parametrize("override,match", [
    ("parallel.not_a_key=1", "not_a_key"),
    ("parallel.cp=two", "cp"),
    ("model.d_modl=32", "d_modl"),
], ids=["unknown-key", "wrong-type", "model-typo"])
def test_hydra_rejects_unknown_keys_and_types(override, match):
    with pytest.raises(ConfigCompositionException, match=match):
        load(override)
    assert not dist.is_initialized()


@pytest.mark.parametrize("overrides,world,match", [
    (["parallel.cp=4"], 2, "world size 2"),
    (["parallel.cp=2", "parallel.dp=3"], 4, "world size 4"),
    (["parallel.cp=4", "parallel.softmax_cp=ulysses", "model.n_heads=6", "model.n_kv_heads=2"], 4, "n_heads"),
    (["parallel.cp=2", "parallel.linear_cp=ulysses", "model.linear_heads=1", "model.linear_head_dim=64"], 2,
     "linear_heads"),
    (["parallel.cp=4", "parallel.softmax_cp=usp"], 4, "ulysses_degree"),
    (["parallel.cp=4", "data.seq_len=60"], 4, "multiple of 8"),
    (["parallel.cp=4", "parallel.layout=contiguous", "data.seq_len=66"], 4, "multiple of 4"),
    (["data.seq_len=8192"], 1, "max_seq_len"),
    (["model.head_dim=192"], 1, "head_dim"),
    (["parallel.tp=2"], 2, "tensor parallelism"),
    (["backend=megatron", "backend.zero_stage=1"], 1, "distributed_optimizer"),
    (["backend=megatron", "parallel.tp=3"], 3, "tp"),
    (["backend=megatron", "parallel.vpp=2"], 1, "vpp"),
    (["parallel=pipeline", "backend.zero_stage=3"], 2, "zero_stage"),
    (["parallel=pipeline", "model.tie_embeddings=true"], 2, "tie_embeddings"),
    (["backend.precision=fp16"], 1, "precision"),
    (["data.vocab_size=128"], 1, "vocab_size"),
    (["trainer.min_lr=1.0"], 1, "min_lr"),
    (["trainer.resume=/no/such/dir"], 1, "resume"),
], ids=["cp>world", "sizes-mismatch", "ulysses-heads", "linear-ulysses-heads", "usp-degree", "zigzag-seq",
        "contiguous-seq", "seq>max", "head-dim", "tp-on-deepspeed", "megatron-zero", "megatron-tp-heads",
        "megatron-vpp-no-pp", "pipe-zero3", "pipe-tied", "precision",
        "data-vocab", "min-lr", "resume-path"])
def test_validate_rejects_before_process_groups(overrides, world, match):
    cfg = load(*overrides)
    with pytest.raises(ValueError, match=match) as err:
        validate(cfg, world_size=world)
    assert "expected" in str(err.value) and "Fix:" in str(err.value)
    assert not dist.is_initialized()


def test_added_keys_are_refused_too():
    """``+key=value`` slips past Hydra's struct mode; to_train_config refuses it."""
    with pytest.raises(ValueError, match=r"trainer\.lr_typo: expected one of the keys of TrainerConfig"):
        load("+trainer.lr_typo=1")
    with pytest.raises(ValueError, match="typo"):
        load("+typo=1")
    assert not dist.is_initialized()


def test_model_config_errors_surface_as_value_errors():
    with pytest.raises(ValueError, match="n_kv_heads"):
        load("model.n_kv_heads=3")  # ModelConfig validates itself when the dataclass is built
    assert not dist.is_initialized()


def test_trainer_validates_before_creating_a_process_group(tmp_path):
    from dist_attn.train.trainer import Trainer
    with pytest.raises(ValueError, match="world size 1"):
        Trainer(load("parallel.cp=2"), str(tmp_path))
    assert not dist.is_initialized()


def test_launcher_reports_config_errors_plainly(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RANK", None)
    res = subprocess.run([sys.executable, "-m", "launchers.train", "parallel.cp=3",
                          f"trainer.out_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "parallel.dp * parallel.tp * parallel.cp * parallel.pp: expected the world size 1" in res.stderr
    assert "Traceback" not in res.stderr


def test_lr_schedule_warmup_peak_and_cosine_floor():
    from types import SimpleNamespace

    from dist_attn.train.config import lr_at
    t = SimpleNamespace(lr=1e-3, min_lr=1e-4, warmup_steps=4, steps=12)
    assert lr_at(t, 0) == 0.0 and lr_at(t, 2) == pytest.approx(5e-4)
    assert lr_at(t, 4) == pytest.approx(1e-3)                       # the peak is reached, not skipped
    assert lr_at(t, 8) == pytest.approx(1e-4 + 0.9e-3 * 0.5)       # half way down the cosine
    assert lr_at(t, 12) == pytest.approx(1e-4) and lr_at(t, 50) == pytest.approx(1e-4)
    no_warmup = SimpleNamespace(lr=1e-3, min_lr=0.0, warmup_steps=0, steps=4)
    assert lr_at(no_warmup, 0) == pytest.approx(1e-3)


@pytest.mark.parametrize("overrides,softmax,linear", [
    (["parallel.cp=2", "parallel.softmax_cp=auto", "parallel.linear_cp=auto"], None, "lasp2"),
    (["parallel.cp=1", "parallel.softmax_cp=auto", "parallel.linear_cp=auto"], "zigzag_ring", "lasp2"),
], ids=["cp2", "cp1"])
def test_auto_strategies_resolve_before_validation(overrides, softmax, linear):
    from dist_attn.context import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
    from dist_attn.cost_model import choose_strategy
    cfg = load(*overrides)
    p = validate(cfg, world_size=cfg.parallel.cp)  # a new, resolved plan: the config keeps "auto"
    m = cfg.model
    assert (cfg.parallel.softmax_cp, cfg.parallel.linear_cp) == ("auto", "auto")
    assert p.softmax_cp in SOFTMAX_STRATEGIES and p.linear_cp in LINEAR_STRATEGIES
    if softmax is None:  # the cost model's own pick for this shape, applied as is
        softmax = choose_strategy("softmax", heads=m.n_heads, kv_heads=m.kv_heads, head_dim=m.softmax_head_dim,
                                  seq_len=cfg.data.seq_len, cp=p.cp, dtype_bytes=4,
                                  batch=cfg.trainer.micro_batch, layout=p.layout)[0]
    assert (p.softmax_cp, p.linear_cp) == (softmax, linear)
    if p.softmax_cp == "usp":
        assert p.ulysses_degree > 1
