"""The batch plan, its refusal of bad combinations before any stage, the dry run, and the launch command."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import pytest

from rerank_dist.cli import main
from rerank_dist.config import ConfigError
from rerank_dist.settings import load_config
from rerank_dist.plan import BatchPlan, plan_batches, plan_for

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("recipe,table", [
    # world: (micro-batch, accumulation); the global batch (16) never changes
    ("qwen3_4b_qlora.yaml", {1: (4, 4), 2: (4, 2), 4: (4, 1), 8: (2, 1), 16: (1, 1)}),
    ("llamarec_llama2_7b.yaml", {1: (2, 8), 2: (2, 4), 4: (2, 2), 8: (2, 1), 16: (1, 1)}),
])
def test_shipped_recipes_run_unchanged_at_1_to_16_processes(recipe, table):
    cfg = load_config(CONFIGS / recipe, world_size=1)
    for world, (micro, accumulation) in table.items():
        plan = plan_for(cfg, world)
        assert plan == BatchPlan(world, 16, micro, accumulation)
        assert plan.world_size * plan.micro_batch_size * plan.accumulation == cfg.train.batch_size


def test_the_micro_batch_is_a_ceiling_not_a_divisibility_rule():
    assert plan_batches(12, 5, 1) == BatchPlan(1, 12, 4, 3)  # 4 is the largest divisor of 12 that is <= 5
    assert plan_batches(8, 3, 2) == BatchPlan(2, 8, 2, 2)
    assert plan_batches(7, 4, 1) == BatchPlan(1, 7, 1, 7)  # a prime share: one example at a time


@pytest.mark.parametrize("batch,micro,world,fix", [
    (16, 4, 3, "train.batch_size=15 or 18"),
    (16, 4, 32, "train.batch_size=32"),
])
def test_a_bad_combination_names_the_three_numbers_and_a_fix(batch, micro, world, fix):
    with pytest.raises(ConfigError) as err:
        plan_batches(batch, micro, world)
    msg = str(err.value)
    assert "\n" not in msg and f"train.batch_size={batch}" in msg and f"train.micro_batch_size={micro}" in msg
    assert f"{world} processes" in msg and fix in msg


def test_a_bad_plan_fails_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun announces 3 processes
    run_dir = tmp_path / "run"
    assert main(["run", f"run_dir={run_dir}", "train.batch_size=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 processes" in err[0]
    assert not run_dir.exists()  # nothing ran: not even the data stage


def test_a_launcher_cannot_change_gradient_accumulation(monkeypatch):
    # accelerate launch exports an accelerate config's gradient_accumulation_steps as this variable, and
    # accelerate would let it override the value the code passes.
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    with pytest.raises(ConfigError, match="gradient accumulation to 1.*needs 8"):
        load_config(overrides=["train.batch_size=8", "train.micro_batch_size=1"], world_size=1)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "8")  # agreeing is fine
    assert plan_for(load_config(world_size=1), 1).accumulation == 8


def test_launch_refuses_a_bad_plan_without_starting_processes(monkeypatch, capsys):
    import rerank_dist.launcher as launcher

    monkeypatch.setattr(launcher, "run_torchrun", lambda *a: pytest.fail("no process may start"))
    assert main(["launch", "--cpu", "--nproc-per-node", "3", "train", "train.batch_size=16"]) == 2
    assert "3 processes" in capsys.readouterr().err


def test_dry_run_prints_the_plan_without_loading_weights(monkeypatch, capsys):
    import transformers

    import rerank_dist.launcher as launcher

    monkeypatch.setattr(launcher, "run_torchrun", lambda *a: pytest.fail("a dry run starts no process"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("a dry run loads no weights"))
    recipe = str(CONFIGS / "qwen3_4b_qlora.yaml")
    assert main(["launch", "--cpu", "--nproc-per-node", "8", "train", "-c", recipe, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "world: 8 process(es) on 1 node(s)" in out
    assert "16 examples per step = 8 process(es) x micro-batch 2 x 1 accumulation" in out
    assert "quantization nf4" in out and "autocast bf16" in out
    assert "memory: ≈" in out and "GiB per device" in out and "configs/models/qwen3-4b" in out
    assert "scoring weights per process, GiB (score.merged_weights): base (nf4) + adapter 2.5 <- this run, " \
           "merged, bfloat16 7.5" in out


def test_scoring_weights_count_the_merged_16_bit_copy_an_nf4_base_becomes():
    """score.merged_weights dequantizes the 4-bit base: every parameter at 2 bytes (bf16), about three
    times the 4-bit base with its adapter, for Qwen3-4B (4.02e9 parameters, tied embeddings once)."""
    from rerank_dist.memory import GIB, estimate_scoring_weights, find_architecture

    cfg = load_config(CONFIGS / "qwen3_4b_qlora.yaml", world_size=1)
    assert (cfg.model.quantization, cfg.model.dtype) == ("nf4", "bfloat16")  # the precondition
    arch, _ = find_architecture(cfg.model.name_or_path, cfg.model.cache_dir)
    held = estimate_scoring_weights(arch, cfg.model)
    assert 4.0e9 * 2 < held["merged"] < 4.05e9 * 2 and held["dtype"] == "bfloat16"
    assert 2.3 * GIB < held["base_and_adapter"] < 2.7 * GIB  # ~3.6e9 matmul weights at ~0.53 bytes + the rest bf16
    plain = estimate_scoring_weights(arch, load_config(CONFIGS / "qwen3_4b_qlora.yaml", world_size=1,
                                                       overrides=["model.quantization=none"]).model)
    assert plain["merged"] == held["merged"] and plain["base_and_adapter"] > plain["merged"]  # + the fp32 adapter


def _launch_args(*argv: str) -> argparse.Namespace:
    from rerank_dist.cli import build_parser

    return build_parser().parse_args(["launch", *argv])


def test_torchrun_command_for_one_and_for_several_nodes():
    from rerank_dist.launcher import check, torchrun_command

    one = torchrun_command(_launch_args("--nproc-per-node", "2", "score", "run_dir=r"), 2)
    assert one[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=2"] and "--standalone" in one
    assert one[-4:] == ["-m", "rerank_dist.cli", "score", "run_dir=r"]
    args = _launch_args("--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "1234",
                        "run", "-c", "x.yaml")
    two = torchrun_command(args, 8)
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=1234"} <= set(two)
    assert "--standalone" not in two and two[-3:] == ["run", "-c", "x.yaml"]
    assert check(_launch_args("--nnodes", "2", "--node-rank", "2", "run")) is not None
    assert check(_launch_args("config")) is not None  # not a stage that runs under processes


def test_cpu_workers_are_told_to_use_the_cpu_backend(monkeypatch):
    from rerank_dist.launcher import child_environment

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = child_environment(_launch_args("--cpu", "--nproc-per-node", "2", "train"), 2)
    # Without it, accelerate in each torchrun worker sees a world of one (and plain PartialState too).
    assert env["ACCELERATE_USE_CPU"] == "true" and int(env["OMP_NUM_THREADS"]) >= 1


def _prepared_run(tmp_path: Path, *overrides: str):
    """A run whose data is prepared (users with 4, 6 and 9 items) and whose retriever never ran."""
    from rerank_dist import pipeline
    from tests.test_data import write_local

    rows = [(u, 100 * u + k, k) for u, n in ((1, 4), (2, 6), (3, 9)) for k in range(n)]
    root = write_local(tmp_path / "raw", rows, [(m, f"Movie {m} (2000)") for _, m, _ in rows])
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.source=local", f"data.raw_dir={root}",
                             "data.min_count=1", "prompt.max_train_examples=0", *overrides])
    pipeline.prepare(cfg, log=lambda _m: None)
    return cfg


def test_training_examples_are_counted_from_the_sequences_without_a_candidates_file(tmp_path):
    """Every prefix (train_prefixes_per_user=0) or no training candidates (train_candidates=none): the
    count comes from the prepared sequences, one example per training prefix with a non-empty history."""
    from rerank_dist.paths import RunPaths
    from rerank_dist.plan import _training_examples

    cfg = _prepared_run(tmp_path, "retriever.train_prefixes_per_user=0", "retriever.train_candidates=none",
                        "prompt.negatives=random", "prompt.train_order=shuffled")
    assert not RunPaths(Path(cfg.run_dir)).candidates("train").exists()  # precondition: no retriever output
    rows, source = _training_examples(cfg)
    assert rows == 1 + 3 + 6 and "every prefix" in source  # n - 3 prefixes per user of n items
    cfg.retriever.train_prefixes_per_user = 2
    assert _training_examples(cfg)[0] == 1 + 2 + 2
    cfg.prompt.max_train_examples = 4
    assert _training_examples(cfg)[0] == 4
    # A stale candidates file is not read when the config makes none.
    stale = RunPaths(Path(cfg.run_dir)).candidates("train")
    stale.parent.mkdir(parents=True)
    pd.DataFrame({"user": [1]}).to_parquet(stale)
    cfg.prompt.max_train_examples = 0
    assert _training_examples(cfg)[0] == 5
    cfg.retriever.train_candidates = "same"
    assert _training_examples(cfg) == (1, f"1 training prefixes in {stale}")


# ---------------------------------------------------------------- model.gradient_checkpointing / quantization auto


def _auto(device_gib: float, *overrides: str) -> dict:
    from rerank_dist.memory import GIB
    from rerank_dist.plan import resolve_auto

    cfg = load_config(CONFIGS / "qwen3_4b_qlora.yaml", overrides=["model.quantization=auto",
                                                                  "model.gradient_checkpointing=auto", *overrides],
                      world_size=1)
    model, record = resolve_auto(cfg, plan_for(cfg, 1), int(device_gib * GIB), "cuda")
    assert (model.quantization, model.gradient_checkpointing) == (record["quantization"], record["gradient_checkpointing"])
    return record


def test_auto_takes_the_fastest_setting_that_the_estimate_fits_into_the_device():
    """Qwen3-4B at micro-batch 4 x 1536 tokens (the recipe), with fake device memories: a large card runs
    16-bit without checkpointing, smaller ones turn on checkpointing, then 4-bit, then both."""
    big = _auto(1000)
    est = big["estimates_gib"]
    assert list(est) == ["quantization=none, gradient_checkpointing=false"]  # the first fits: no more tried
    plain = est["quantization=none, gradient_checkpointing=false"]
    assert (big["quantization"], big["gradient_checkpointing"]) == ("none", "false") and "fits" in big["reason"]
    every = _auto(1)["estimates_gib"]  # nothing fits 1 GiB: every option estimated, the least-memory one taken
    assert list(every) == ["quantization=none, gradient_checkpointing=false", "quantization=none, gradient_checkpointing=true",
                           "quantization=nf4, gradient_checkpointing=false", "quantization=nf4, gradient_checkpointing=true"]
    ckpt, nf4, both = (every[k] for k in list(every)[1:])
    print(f"Qwen3-4B estimates, GiB: {every}")
    assert both < ckpt < plain  # the precondition: each of these steps saves memory
    # A device just above an option's estimate / headroom gets it, unless a faster one fits too.
    for gib in (ckpt / 0.9 + 0.1, both / 0.9 + 0.1, nf4 / 0.9 + 0.1):
        record = _auto(gib)
        fitting = [k for k, v in every.items() if v <= 0.9 * gib]
        assert f"quantization={record['quantization']}, gradient_checkpointing={record['gradient_checkpointing']}" \
            == fitting[0], (gib, record)
    assert (_auto(ckpt / 0.9 + 0.1)["quantization"], _auto(both / 0.9 + 0.1)["quantization"]) == ("none", "nf4")
    lost = _auto(1)
    assert (lost["quantization"], lost["gradient_checkpointing"]) == ("nf4", "true") and "no setting fits" in lost["reason"]


def test_auto_varies_only_the_fields_set_to_auto_and_a_forced_qlora_stays():
    forced = _auto(1000, "model.quantization=nf4")  # the recipes' way to force QLoRA
    assert forced["quantization"] == "nf4" and forced["gradient_checkpointing"] == "false"
    cfg = load_config(CONFIGS / "qwen3_4b_qlora.yaml", world_size=1)
    assert (cfg.model.quantization, cfg.model.gradient_checkpointing) == ("nf4", "true")  # the recipe as shipped
    from rerank_dist.plan import resolve_auto

    model, record = resolve_auto(cfg, plan_for(cfg, 1), 1, "cuda")
    assert model is cfg.model and record["reason"] == "set in the config"


def test_gradient_checkpointing_reads_true_false_and_auto():
    assert load_config(overrides=["model.gradient_checkpointing=true"]).model.gradient_checkpointing == "true"
    assert load_config(overrides=["model.gradient_checkpointing=false"]).model.gradient_checkpointing == "false"
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        load_config(overrides=["model.gradient_checkpointing=sometimes"])
