"""Export: stock PEFT adapter, sharded merged safetensors, manifest; scores equal the pipeline's; atomic."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rerank_dist.config import ExportConfig, ModelConfig
from rerank_dist.settings import load_config
from rerank_dist.export import export_run, merged_dtype
from rerank_dist.io import read_json
from rerank_dist.paths import RunPaths

SHARD = "100KB"  # the tiny Llama is ~0.45 MB in float32, so this gives several shards


def _copy_run(trained_run, dest: Path, *extra: str):
    """A private copy of the session's finished run (never changed) and its config pointed at the copy.

    Any export/ the run itself wrote (export.in_run) is left out: each test makes its own.
    """
    run_dir, overrides = trained_run
    shutil.copytree(run_dir, dest, ignore=lambda d, names: ["export"] if Path(d) == Path(run_dir) else [])
    return load_config(overrides=[*overrides, f"run_dir={dest}", *extra])


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """One merged export, in float32 and several shards, shared by the shard and score tests."""
    cfg = _copy_run(trained_run, tmp_path_factory.mktemp("export") / "run",
                    "export.merged=true", "export.dtype=float32", f"export.max_shard_size={SHARD}")
    lines: list[str] = []
    manifest = export_run(cfg, log=lines.append)
    return cfg, manifest, lines


def test_merged_model_is_sharded_safetensors(exported):
    cfg, manifest, lines = exported
    export = RunPaths(Path(cfg.run_dir)).export
    merged = export / "merged"
    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(shards) >= 3, shards
    index = read_json(merged / "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == shards
    assert manifest["shards"] == shards and manifest["max_shard_size"] == SHARD
    assert not list(export.rglob("*.bin")) and not list(export.rglob("*.pt"))
    assert read_json(export / "export.json") == manifest
    assert manifest["merged_dtype"] == "float32" and manifest["adapter_step"] == read_json(
        RunPaths(Path(cfg.run_dir)).best / "verbalizer.json")["step"]
    adapter = export / "adapter"
    assert hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest() == manifest["adapter_sha256"]
    for d in (adapter, merged):
        assert {"verbalizer.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in d.iterdir()}
        assert read_json(d / "tokenizer_config.json")["padding_side"] == "left"  # as the scorer pads
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert "quantization_config" not in read_json(merged / "config.json")
    assert len(lines) == 3 and lines[0].startswith("[export] adapter") and lines[1].startswith("[export] merged")
    assert not list(export.parent.glob(".export*"))


def _pipeline_prompts(cfg, tokenizer):
    """The test prompts exactly as score.score_split builds them."""
    from rerank_dist.config import labels_for
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.examples import build_examples, tokenize_examples

    paths = RunPaths(Path(cfg.run_dir))
    dataset = load_dataset(paths.data)
    candidates = pd.read_parquet(paths.candidates("test"))
    examples, _ = build_examples(candidates, dataset, cfg.prompt, labels_for(cfg), tokenizer, "test", dataset.num_items)
    return examples, tokenize_examples(examples, tokenizer)


def _score(model, cfg, token_lists, verbalizer, pad_id) -> np.ndarray:
    from accelerate import Accelerator

    from rerank_dist.score import score_prompts

    label_ids = torch.tensor(verbalizer["label_ids"], dtype=torch.long)  # (K,)
    return score_prompts(Accelerator(cpu=True), model, token_lists, label_ids, pad_id, cfg.score.batch_size)  # (N, K)


def test_exported_models_score_as_the_pipeline_did(exported, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _, _ = exported
    paths = RunPaths(Path(cfg.run_dir))
    adapter, merged = paths.export / "adapter", paths.export / "merged"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert AutoTokenizer.from_pretrained(merged).pad_token_id == tokenizer.pad_token_id
    verbalizer = read_json(adapter / "verbalizer.json")
    assert read_json(merged / "verbalizer.json") == verbalizer
    examples, token_lists = _pipeline_prompts(cfg, tokenizer)

    rankings = pd.read_parquet(paths.rankings("test"))
    assert rankings["user"].tolist() == [ex.user for ex in examples] and len(examples) == 610
    expected = np.stack(rankings["scores"].to_numpy()).astype(np.float32)  # (610, K)

    def score(model):
        return _score(model, cfg, token_lists, verbalizer, tokenizer.pad_token_id)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    bare = _score(base, cfg, token_lists[:64], verbalizer, tokenizer.pad_token_id)  # (64, K): enough for the margin
    via_adapter = score(PeftModel.from_pretrained(base, adapter))
    via_merged = score(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))

    adapter_diff = float(np.abs(via_adapter - expected).max())
    merged_diff = float(np.abs(via_merged - expected).max())
    training_effect = float(np.abs(via_merged[:64] - bare).max())
    print(f"\nmax |score diff| vs pipeline: adapter {adapter_diff:.3g}, merged {merged_diff:.3g}; "
          f"merged vs bare base {training_effect:.3g} (scores span {expected.min():.3g}..{expected.max():.3g})")
    assert adapter_diff == 0.0  # same files, same computation: bit-identical
    # W + scale*B@A is rounded once into W, where the unmerged path adds x@W.T and scale*(x@A.T)@B.T.
    assert merged_diff <= 1e-5
    assert training_effect > 1e-2  # 1000x the merge tolerance (~0.2 measured): a merge that did nothing fails


def test_adapter_only_export(trained_run, tmp_path):
    cfg = _copy_run(trained_run, tmp_path / "run", "export.merged=false")
    manifest = export_run(cfg, log=lambda _: None)
    export = RunPaths(Path(cfg.run_dir)).export
    assert sorted(p.name for p in export.iterdir()) == ["adapter", "export.json"]
    assert manifest["merged"] is False and manifest["shards"] == [] and manifest["merged_dtype"] is None


def test_quantization_auto_exports_as_training_decided_it(trained_run, tmp_path):
    cfg = _copy_run(trained_run, tmp_path / "run", "export.merged=false", "model.quantization=auto")
    recorded = RunPaths(Path(cfg.run_dir)).best / "config.yaml"
    assert "quantization: none" in recorded.read_text()  # what the training run decided and recorded
    assert export_run(cfg, log=lambda _: None)["trained_quantization"] == "none"
    recorded.write_text(recorded.read_text().replace("quantization: none", "quantization: auto"))
    with pytest.raises(FileNotFoundError, match="model.quantization=auto needs the quantization training chose"):
        export_run(cfg, log=lambda _: None)


def test_missing_adapter_is_one_clear_line(trained_run, tmp_path):
    cfg = _copy_run(trained_run, tmp_path / "run")
    shutil.rmtree(RunPaths(Path(cfg.run_dir)).best)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors") as err:
        export_run(cfg, log=lambda _: None)
    assert "\n" not in str(err.value) and "train" in str(err.value)
    assert not (tmp_path / "run" / "export").exists() and not list((tmp_path / "run").glob(".export*"))


def test_a_failed_export_leaves_the_earlier_one_intact(trained_run, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    cfg = _copy_run(trained_run, tmp_path / "run", "export.merged=false")
    export_run(cfg, log=lambda _: None)
    export = RunPaths(Path(cfg.run_dir)).export
    before = _listing(export)

    real_save = PreTrainedModel.save_pretrained
    seen: list[str] = []

    def save_then_die(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # the shards are on disk (in the temp dir) ...
        seen.extend(p.name for p in Path(directory).glob("*.safetensors"))
        raise RuntimeError("killed mid-export")  # ... when the export dies

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_die)
    cfg.export.merged, cfg.export.max_shard_size = True, SHARD
    with pytest.raises(RuntimeError, match="killed mid-export"):
        export_run(cfg, log=lambda _: None)
    assert len(seen) >= 3
    assert _listing(export) == before
    assert [p.name for p in export.parent.iterdir() if p.name.startswith(".export")] == []


def test_merged_dtype_every_combination():
    want_auto = {("none", "float32"): torch.float32, ("none", "bfloat16"): torch.bfloat16,
                 ("none", "float16"): torch.float16, ("nf4", "float32"): torch.float32,
                 ("nf4", "bfloat16"): torch.bfloat16, ("nf4", "float16"): torch.float32}
    explicit = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    for (quant, dtype), export_dtype in itertools.product(want_auto, ["auto", *explicit]):
        got = merged_dtype(ModelConfig(quantization=quant, dtype=dtype), ExportConfig(dtype=export_dtype))
        assert got == (want_auto[(quant, dtype)] if export_dtype == "auto" else explicit[export_dtype]), \
            (quant, dtype, export_dtype)
    # auto for a 4-bit model is exactly the compute dtype training used
    from rerank_dist.modeling import _quantization_config

    for dtype in ("float32", "bfloat16"):
        m = ModelConfig(quantization="nf4", dtype=dtype)
        assert merged_dtype(m, ExportConfig()) == _quantization_config(m).bnb_4bit_compute_dtype


def test_nf4_run_merges_into_an_unquantized_base(trained_run, tmp_path, monkeypatch):
    """The base for the merge is loaded with quantization=none (so no bitsandbytes / GPU is needed)."""
    import rerank_dist.export as export_mod

    cfg = _copy_run(trained_run, tmp_path / "run", f"export.max_shard_size={SHARD}")
    cfg.model.quantization = "nf4"  # as if trained with QLoRA in float32 compute
    loaded = []
    real_load = export_mod.load_base_model

    def spy(model_cfg, **kwargs):
        loaded.append((model_cfg.quantization, model_cfg.dtype, kwargs.get("device")))
        return real_load(model_cfg, **kwargs)

    monkeypatch.setattr(export_mod, "load_base_model", spy)
    manifest = export_run(cfg, log=lambda _: None)
    assert loaded == [("none", "float32", "cpu")]
    assert manifest["merged_dtype"] == "float32" and manifest["trained_quantization"] == "nf4"
    config = json.loads((Path(cfg.run_dir) / "export" / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
