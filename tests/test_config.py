from pathlib import Path

import pytest
import yaml

from rerank_dist.cli import main
from rerank_dist.config import ConfigError, RunConfig, describe_fields
from rerank_dist.settings import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def test_there_are_configs():
    assert len(RUN_CONFIGS) >= 3 and len(ACCELERATE_CONFIGS) >= 2


@pytest.mark.parametrize("path", RUN_CONFIGS + ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_yaml_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("rerank-dist" in first or "accelerate launch" in first), first
    if path.parent.name == "accelerate":
        assert "--config_file configs/accelerate/" + path.name in first
    else:
        assert path.name in first


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_configs_load_and_validate(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.run_dir == raw["run_dir"]
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert got == value or (isinstance(value, float) and got == pytest.approx(value)) or (
                    isinstance(value, bool) and got == str(value).lower()), (section, key)  # true|false|auto fields


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 2


def test_every_field_documented():
    lines = describe_fields()
    assert len(lines) > 40
    assert all(line.split(": ", 1)[1].strip() for line in lines), [l for l in lines if not l.split(": ", 1)[1].strip()]


def test_bool_strings_are_not_all_true():
    assert load_config(overrides=["score.fusion=false"]).score.fusion is False
    assert load_config(overrides=["score.fusion=False"]).score.fusion is False
    with pytest.raises(ConfigError, match="score.fusion: expected true/false"):
        load_config(overrides=["score.fusion=maybe"])


def test_validation_reports_every_problem_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun announces it
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n  batch_size: 16\nmodel:\n  dtype: int8\n  lora_layers: -2\nretriever:\n  top_k: 40\nnope: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    lines = str(err.value).splitlines()
    text = str(err.value)
    assert "train.lr" in text and "model.dtype" in text and "retriever.top_k" in text and "nope" in text
    assert "model.lora_layers: expected 0" in text
    assert "train.batch_size=16" in text and "3 processes" in text  # 16 examples do not split over 3 processes
    assert all(line.startswith(str(bad)) for line in lines)


def test_overrides_types():
    cfg = load_config(overrides=["train.lr=3e-4", "model.lora_target_modules=[q_proj,k_proj]", "run_dir=x"])
    assert cfg.train.lr == 3e-4 and cfg.model.lora_target_modules == ["q_proj", "k_proj"] and cfg.run_dir == "x"
    assert isinstance(RunConfig().section_hash("data"), str)


def test_cli_config_error_exits_2(capsys):
    assert main(["config", "train.lr=abc", "model.quantization=int3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_cli_missing_config_file(capsys, tmp_path):
    assert main(["prepare", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cli_help_for_every_stage(capsys):
    for stage in ["prepare", "retrieve", "train", "score", "report", "run", "config"]:
        with pytest.raises(SystemExit) as e:
            main([stage, "--help"])
        assert e.value.code == 0
        assert "overrides" in capsys.readouterr().out


def test_yes_no_on_off_stay_strings_where_a_string_is_expected(tmp_path):
    # YAML 1.1 (PyYAML's default) reads `no` as False; train.mixed_precision=no must stay "no".
    assert load_config(overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\nscore:\n  fusion: off\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.score.fusion is False  # bools still read


# ---------------------------------------------------------------- extends


def test_extends_starts_from_the_other_file_and_overrides_field_by_field(tmp_path):
    (tmp_path / "base.yaml").write_text("run_dir: runs/base\ntrain:\n  lr: 0.002\n  batch_size: 16\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nrun_dir: runs/child\ntrain:\n  backend: zero3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.run_dir, cfg.train.backend, cfg.train.lr, cfg.train.batch_size) == ("runs/child", "zero3", 0.002, 16)


def test_extends_cycle_and_missing_parent_are_clear_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml: config file not found \(extended by .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("recipe,parent,backend", [
    ("qwen3_4b_qlora_zero3.yaml", "qwen3_4b_qlora.yaml", "zero3"),
    ("qwen3_4b_qlora_fsdp.yaml", "qwen3_4b_qlora.yaml", "fsdp"),
    ("llamarec_llama2_7b_zero3.yaml", "llamarec_llama2_7b.yaml", "zero3"),
    ("llamarec_llama2_7b_fsdp.yaml", "llamarec_llama2_7b.yaml", "fsdp"),
    ("llamarec_llama2_7b_lora_zero2.yaml", "llamarec_llama2_7b.yaml", "zero2"),
])
def test_backend_recipes_are_their_parent_but_for_the_backend(recipe, parent, backend):
    child, base = load_config(CONFIGS / recipe), load_config(CONFIGS / parent)
    assert (child.train.backend, base.train.backend) == (backend, "ddp")
    assert child.run_dir != base.run_dir
    child.train.backend, child.run_dir = base.train.backend, base.run_dir
    if recipe.endswith("lora_zero2.yaml"):
        assert child.model.quantization == "none"
        child.model.quantization = base.model.quantization
    assert child.to_dict() == base.to_dict()


def test_the_cpu_recipe_is_the_embedded_default_spelled_out():
    """configs/smollm2_cpu.yaml says it is what `make demo` runs: every field but run_dir must agree."""
    import dataclasses

    default, recipe = load_config(), load_config(Path(__file__).parent.parent / "configs" / "smollm2_cpu.yaml")
    differ = [f"{section}.{name}" for section in ("data", "retriever", "prompt", "model", "train", "score", "export")
              for name, value in dataclasses.asdict(getattr(default, section)).items()
              if dataclasses.asdict(getattr(recipe, section))[name] != value]
    assert recipe.run_dir != default.run_dir and differ == []


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("llamarec_*.yaml")))
def test_llamarec_recipes_train_on_llamarecs_training_set_with_its_early_stopping(recipe):
    cfg = load_config(CONFIGS / recipe)
    # Every prefix of seq[:-2], 19 random negatives outside the history, shown shuffled, no retriever
    # candidates made for them; validation every 100 steps, patience 20 validations.
    assert (cfg.retriever.train_prefixes_per_user, cfg.retriever.train_candidates) == (0, "none")
    assert (cfg.prompt.negatives, cfg.prompt.train_order, cfg.prompt.eval_order) == ("random", "shuffled", "retriever")
    assert cfg.prompt.max_train_examples == 0 and cfg.retriever.top_k == 20
    assert (cfg.train.eval_every, cfg.train.patience, cfg.train.eval_users) == (100, 20, 0)
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.epochs, cfg.train.batch_size) == (1e-4, 100, 1, 16)


def test_every_prefix_rules_out_a_held_out_retriever_and_random_negatives_need_no_candidates():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["retriever.train_prefixes_per_user=0", "retriever.train_candidates=held_out"])
    assert "held_out" in str(err.value) and "every prefix" in str(err.value)
    with pytest.raises(ConfigError, match="train_candidates: none makes no training candidates"):
        load_config(overrides=["retriever.train_candidates=none", "prompt.negatives=retriever"])
    ok = load_config(overrides=["retriever.train_prefixes_per_user=0", "retriever.train_candidates=none",
                                "prompt.negatives=random", "prompt.train_order=shuffled"])
    assert ok.retriever.train_prefixes_per_user == 0


def test_scorer_options_are_typed_checked_together_and_off_by_default():
    cfg = load_config()
    assert cfg.score.token_budget == 0 and cfg.score.merged_weights is False
    on = load_config(overrides=["score.token_budget=4096", "score.merged_weights=true"])
    assert on.score.token_budget == 4096 and on.score.merged_weights is True
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["score.token_budget=-1", "score.merged_weights=maybe"])
    assert "score.token_budget: expected >= 0, got -1" in str(err.value)
    assert "score.merged_weights: expected true/false, got 'maybe'" in str(err.value)
