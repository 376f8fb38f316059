"""Bad configurations fail before any process group starts, naming the field and the fix."""
from __future__ import annotations

import pytest

from plt_train.config import ConfigError
from plt_train.config.store import hydra_argv_for_rank
from plt_train.models import validate
from tests.helpers import DENSE_BASELINE, REPO, compose_run

# Each bad config below is one change to the dense GPT baseline (the default is the flagship).


def test_default_config_is_valid_for_two_processes():
    cfg = compose_run([])
    validate(cfg, world_size=2)
    assert (cfg.model.name, cfg.model.loops, cfg.model.moe.layer, cfg.parallel.expert) == (
        "plt", 2, "bigmac", 2)  # the flagship


@pytest.mark.parametrize("overrides, world, field, words", [
    (["parallel.tensor=2", "parallel.pipeline=2"], 2, "parallel", "not divisible"),
    (["parallel.tensor=3"], 3, "parallel.tensor", "does not divide the attention heads"),
    (["model.num_attention_heads=6"], 1, "model.hidden_size", "not divisible"),
    (["model.num_query_groups=3"], 1, "model.num_query_groups", "does not divide"),
    (["parallel.pipeline=3"], 3, "parallel.pipeline", "do not divide"),
    (["parallel.data=4"], 2, "parallel.data", "gives 2"),
    (["parallel.expert=4"], 2, "parallel.expert", "not divisible"),
    (["train.global_batch_size=12"], 2, "train.global_batch_size", "multiple of 16"),
    (["parallel.sequence_parallel=true"], 2, "parallel.sequence_parallel", "tensor parallel"),
    (["parallel.context=2"], 2, "parallel.context", "not wired"),
    (["optim.warmup_steps=1000"], 2, "optim.warmup_steps", "not below the decay steps"),
    # megatron's scheduler asserts warmup < decay (here train.steps) after the model is built
    (["train.steps=20", "optim.warmup_steps=20"], 2, "optim.warmup_steps", "not below"),
    (["optim.decay_steps=5", "optim.warmup_steps=5"], 2, "optim.warmup_steps", "not below"),
    (["optim.weight_decay=-0.1"], 2, "optim.weight_decay", ">= 0"),
    (["train.log_interval=0"], 2, "train.log_interval", ">= 1"),
    (["train.max_skipped_steps=-1"], 2, "train.max_skipped_steps", ">= 0"),
    (["checkpoint.keep_last=0"], 2, "checkpoint.keep_last", ">= 1"),
    # single values out of range (issue 21): each used to reach a traceback or pass silently
    (["model.num_attention_heads=0"], 2, "model.num_attention_heads", ">= 1"),
    (["model.num_layers=0"], 2, "model.num_layers", ">= 1"),
    (["model.hidden_size=-8"], 2, "model.hidden_size", ">= 1"),
    (["model.num_query_groups=0"], 2, "model.num_query_groups", ">= 1"),
    (["model.make_vocab_size_divisible_by=0"], 2, "model.make_vocab_size_divisible_by", ">= 1"),
    (["model.hidden_dropout=1.0"], 2, "model.hidden_dropout", "[0, 1)"),
    (["model.attention_dropout=-0.1"], 2, "model.attention_dropout", "[0, 1)"),
    (["optim.lr=-1e-3"], 2, "optim.lr", "> 0"),
    (["optim.beta1=1.0"], 2, "optim.beta1", "[0, 1)"),
    (["optim.beta2=-0.5"], 2, "optim.beta2", "[0, 1)"),
    (["optim.eps=0"], 2, "optim.eps", "> 0"),
    (["optim.clip_grad=-1"], 2, "optim.clip_grad", ">= 0"),
    (["train.seed=-1"], 2, "train.seed", ">= 0"),
    (["data.num_workers=-2"], 2, "data.num_workers", ">= 0"),
    (["parallel.timeout_s=0"], 2, "parallel.timeout_s", "> 0"),
    (["parallel.bucket_size=0"], 2, "parallel.bucket_size", ">= 1"),
    (["parallel.overlap_param_gather=true", "parallel.overlap_grad_reduce=true"], 2,
     "parallel.overlap_param_gather", "distributed optimizer"),
    (["checkpoint.save_timeout_s=-5"], 2, "checkpoint.save_timeout_s", "> 0"),
    (["downstream.tasks=[plt_tiny_mc]", "downstream.interval=5", "parallel.tensor=2"], 2,
     "downstream.tasks", "whole layers on every rank (TP = PP = 1)"),
    (["downstream.tasks=[plt_tiny_mc]", "downstream.batch_size=0"], 2,
     "downstream.batch_size", ">= 1"),
    (["optim.decay_style=wsd"], 2, "optim.wsd_decay_steps", "between 1 and"),
    (["optim.decay_style=wsd", "train.steps=100", "optim.warmup_steps=20",
      "optim.wsd_decay_steps=81"], 2, "optim.wsd_decay_steps", "(100 - 20)"),
    (["sample.prompt=hi", "sample.max_new_tokens=0"], 2, "sample.max_new_tokens", ">= 1"),
    (["sample.prompt=hi", "sample.top_p=0"], 2, "sample.top_p", "(0, 1]"),
    (["train.spike_zscore=-1"], 2, "train.spike_zscore", ">= 0"),
    (["train.spike_window=1"], 2, "train.spike_window", ">= 2"),
    (["train.global_batch_size=0"], 2, "train.global_batch_size", "must be >= 1"),
    (["model.seq_length=0"], 2, "model.seq_length", ">= 1"),
    (["model.ffn_hidden_size=1001", "parallel.tensor=2"], 2, "model.ffn_hidden_size",
     "multiple of parallel.tensor"),
    (["model.vocab_size=100"], 2, "model.vocab_size", "smaller than"),
    # a validation split of weight 0 builds no dataset; the first evaluation would crash
    (["data.split='100,0,0'"], 2, "data.split", "validation split no documents"),
    (["data.split='0,100,0'"], 2, "data.split", "train split no documents"),
    (["data.split='98,x'"], 2, "data.split", "not comma-separated"),
    (["model.name=plt", "model.loops=2", "model.attention_dropout=0.1"], 2,
     "model.attention_dropout", "no dropout"),
    (["optim.min_lr=1.0"], 2, "optim.min_lr", "must be in"),
    (["model.loops=2"], 2, "model.loops", "need a looped model"),
    (["model.name=vanilla", "model.loops=3"], 2, "model.loops", "runs its block once"),
    (["model.name=plt", "model.loops=0"], 2, "model.loops", "must be >= 1"),
    (["model.name=plt", "model.loops=2", "model.loop.window=0"], 2, "model.loop.window", ">= 1"),
    (["model.name=plt", "model.loops=2", "parallel.pipeline=2", "train.global_batch_size=24"],
     2, "train.global_batch_size", "interleaved schedule"),
    (["model.backend=te"], 2, "model.backend", "not installed"),
    (["model.name=plt", "model.loops=2", "model.backend=te"], 2, "model.backend", "local"),
    (["model.make_vocab_size_divisible_by=127", "parallel.tensor=2"], 2,
     "model.make_vocab_size_divisible_by", "multiple"),
])
def test_invalid_configs_name_the_field(overrides, world, field, words):
    cfg = compose_run(DENSE_BASELINE + overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    assert err.value.field == field
    assert words in str(err.value) and "Fix:" in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["data.split='100,0,0'", "train.eval_interval=0"],  # no validation split, none asked for
    ["data.split='98,2'"],  # the test weight left out
    ["moe=bigmac", "model.ffn_hidden_size=1001", "parallel.tensor=2",
     "parallel.sequence_parallel=true"],  # every MLP is MoE: the dense width is unused
    ["train.steps=21", "optim.warmup_steps=20"],
    ["model.vocab_size=8192"],
])
def test_edge_configs_that_are_valid(overrides):
    validate(compose_run(DENSE_BASELINE + overrides), world_size=2)


def test_model_vocab_size_sets_the_embedding_rows():
    from plt_train.config.schema import ModelConfig

    assert ModelConfig().padded_vocab_size(8000) == 8064  # the tokenizer's, padded to 128
    assert ModelConfig(vocab_size=9000).padded_vocab_size(8000) == 9088
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        ModelConfig(vocab_size=7999).padded_vocab_size(8000)


@pytest.mark.parametrize("choice, cpu, cuda", [("auto", False, True), ("on", True, True),
                                               ("off", False, False)])
def test_swiglu_fusion_is_the_device_default_unless_set(choice, cpu, cuda):
    """model.swiglu_fusion becomes megatron's bias_activation_fusion: "auto" takes the
    device's default (on with CUDA, as in Megatron-LM), "on" / "off" override it."""
    import torch

    from plt_train.config.schema import ParallelConfig
    from plt_train.models.transformer_config import to_transformer_config
    from plt_train.runtime.device import DeviceInfo, megatron_device_kwargs

    model = compose_run(["experiment=debug", f"model.swiglu_fusion={choice}"]).model
    for kind, want in (("cpu", cpu), ("cuda", cuda)):
        kwargs = megatron_device_kwargs(DeviceInfo(torch.device(kind), "gloo", kind))
        tc = to_transformer_config(model, ParallelConfig(), torch.float32, kwargs)
        assert tc.bias_activation_fusion is want, (choice, kind)


def test_unknown_key_is_rejected_by_the_schema():
    with pytest.raises(Exception) as err:
        compose_run(["model.hidden_sise=128"])
    assert "hidden_sise" in str(err.value)


def test_wrong_type_is_rejected_by_the_schema():
    with pytest.raises(Exception) as err:
        compose_run(["optim.lr=abc"])
    assert "lr" in str(err.value)


def test_ranks_share_one_run_dir_and_only_rank0_writes_hydra_files():
    env0 = {"RANK": "0", "TORCHELASTIC_RUN_ID": "abc"}
    env1 = {"RANK": "1", "TORCHELASTIC_RUN_ID": "abc"}
    argv0, argv1 = hydra_argv_for_rank(["name=x"], env0), hydra_argv_for_rank(["name=x"], env1)
    assert "hydra.run.dir=outputs/x" in argv0 and "hydra.run.dir=outputs/x" in argv1
    assert "hydra.output_subdir=null" in argv1 and "hydra.output_subdir=null" not in argv0
    # The name alone: a re-run (another torchrun id, another Slurm job) finds the same folder.
    assert "hydra.run.dir=outputs/x" in hydra_argv_for_rank(
        ["name=x"], {**env0, "TORCHELASTIC_RUN_ID": "other", "SLURM_JOB_ID": "77"})
    # run_dir= doubles as Hydra's directory, so nothing is written elsewhere.
    assert "hydra.run.dir=/r" in hydra_argv_for_rank(["run_dir=/r"], env0)
    # A user-chosen directory is left alone.
    assert hydra_argv_for_rank(["hydra.run.dir=/d", "hydra.sweep.dir=/s"], env0) == [
        "hydra.run.dir=/d", "hydra.sweep.dir=/s"]
    assert "hydra.sweep.dir=multirun/x/abc" in argv1  # a sweep also shares one folder


def _readme_launches() -> list[tuple[int, list[str]]]:
    """(world size, overrides) of every ``make train ARGS=...`` (2 processes) and ``sbatch
    --nodes=N --gpus-per-node=G ...`` example in the README, continuation lines joined."""
    import re
    import shlex

    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    found = [(2, shlex.split(a)) for a in re.findall(r'make train ARGS="([^"]*)"', text)]
    for nodes, gpus, rest in re.findall(
            r"sbatch --nodes=(\d+) --gpus-per-node=(\d+) launch/slurm/train\.sbatch ([^\n#]*)",
            text):
        found.append((int(nodes) * int(gpus), shlex.split(rest)))
    return found


def test_readme_launch_examples_are_valid():
    """The README's launch lines pass validation at their world size (two had drifted: a
    1b run whose default batch did not divide, and a looped PP=2 run under the flagship's
    EP=2)."""
    launches = _readme_launches()
    assert len(launches) >= 6 and any(world == 32 for world, _ in launches)
    for world, overrides in launches:
        validate(compose_run(overrides), world_size=world)


@pytest.mark.parametrize("override, key, allowed", [
    ("model.name=nope", "model.name", "gpt, vanilla, looped, plt"),
    ("model.loop.gate=x", "model.loop.gate", "query, input"),
    ("model.swiglu_fusion=yes", "model.swiglu_fusion", "auto, on, off"),
    ("optim.decay_style=step", "optim.decay_style",
     "cosine, linear, constant, inverse_square_root, wsd"),
    ("optim.wsd_decay_style=step", "optim.wsd_decay_style",
     "linear, cosine, exponential, minus_sqrt"),
    ("train.precision=fp16", "train.precision", "auto, fp32, bf16"),
    ("logging.wandb_mode=cloud", "logging.wandb_mode", "offline, online, disabled"),
    ("model.moe.layer=sparse", "model.moe.layer", "dense, fine_grained, bigmac"),
    ("model.loop.kernel=cuda", "model.loop.kernel", "auto, triton, torch"),
])
def test_unknown_choices_fail_naming_the_field_and_the_choices(override, key, allowed):
    """Every choice is a StrEnum of the schema: Hydra refuses an unknown value naming the key
    and listing the choices, and so does a dataclass built in Python."""
    import dataclasses

    from plt_train.config.schema import RunConfig

    with pytest.raises(Exception) as err:
        compose_run(DENSE_BASELINE + [override])
    text = f"{err.value} {err.value.__cause__}"
    assert key in text and f"[{allowed}]" in text, text
    section_path, field = key.rsplit(".", 1)
    section = RunConfig()
    for part in section_path.split("."):
        section = getattr(section, part)
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(section, **{field: override.split("=")[1]})
    assert err.value.field == key and allowed in str(err.value)


def test_choices_are_enums_equal_to_their_strings():
    from plt_train.config.schema import DecayStyle, MLPLayer, ModelConfig, MoEConfig

    cfg = compose_run(["moe=bigmac", "optim.decay_style=inverse_square_root"])
    assert cfg.model.moe.layer is MLPLayer.bigmac and cfg.model.moe.layer == "bigmac"
    assert cfg.optim.decay_style == "inverse-square-root"  # megatron's spelling
    # Strings given in Python become members (by value or name), as omegaconf's do.
    m = ModelConfig(name="plt", loops=2, moe=MoEConfig(layer="fine_grained"))
    assert m.moe.layer is MLPLayer.fine_grained and m.parallel_loops and m.uses_gswa
    assert ModelConfig(name="looped", loops=2).parallel_loops is False
    assert DecayStyle("inverse-square-root") is DecayStyle["inverse_square_root"]


def test_a_choice_assigned_after_construction_is_checked_by_validate():
    from plt_train.config import validate as validate_config

    cfg = compose_run(DENSE_BASELINE)
    cfg.model.backend = "tpu"
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, 2)
    assert err.value.field == "model.backend"


def test_bf16_without_cuda_is_refused_up_front():
    """It used to fail after the model was built, inside megatron's optimizer (TypeError:
    'Wrapped parameters must be one of torch.cuda.FloatTensor, ...')."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("bf16 is valid with CUDA")
    with pytest.raises(ConfigError, match="train.precision: bf16 needs CUDA"):
        validate(compose_run(DENSE_BASELINE + ["train.precision=bf16"]), 2)
