"""model.dtype auto: the resolver's rules (capability probes mocked both ways), explicit dtypes passing
through, config validation, and every reader of model.dtype following the resolved dtype."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from rerank_dist import hardware
from rerank_dist import modeling as M
from rerank_dist.config import ConfigError, ExportConfig, ModelConfig, RunConfig
from rerank_dist.settings import load_config
from rerank_dist.hardware import planned_dtype, resolve_dtype
from tests.tiny_models import build_tiny_model
from tests.tiny_tokenizers import build_bytelevel_bpe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPLICIT = ("bfloat16", "float32", "float16")


def mock_cpu(monkeypatch, capability: str, avx512_bf16: bool = False, amx: bool = False) -> None:
    """torch's CPU probes, as a CPU of `capability` with (or without) AVX512-BF16 and AMX reports them."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def mock_cuda(monkeypatch, bf16: bool) -> list[dict]:
    """torch.cuda.is_bf16_supported answering bf16; returns the keyword arguments it was called with."""
    calls: list[dict] = []

    def is_bf16_supported(**kwargs):
        calls.append(kwargs)
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(hardware, "_cuda_name", lambda dev: "Test GPU (sm_75)")
    return calls


# ---------------------------------------------------------------- the rules


def test_avx2_cpu_without_bf16_gets_float32(monkeypatch):
    mock_cpu(monkeypatch, "AVX2")
    dtype, reason = resolve_dtype("auto", "cpu")
    assert dtype == "float32"
    assert "AVX2" in reason and "without native bfloat16" in reason and reason.endswith("float32")


def test_avx512_cpu_with_avx512_bf16_gets_bfloat16(monkeypatch):
    mock_cpu(monkeypatch, "AVX512", avx512_bf16=True)
    assert resolve_dtype("auto", "cpu") == ("bfloat16", "CPU AVX512 with AVX512-BF16: native bfloat16")


def test_avx512_without_its_bf16_extension_gets_float32(monkeypatch):
    mock_cpu(monkeypatch, "AVX512")  # e.g. Skylake-X: AVX512 but no AVX512-BF16
    assert resolve_dtype("auto", "cpu")[0] == "float32"


def test_amx_cpu_gets_bfloat16(monkeypatch):
    mock_cpu(monkeypatch, "AVX512", amx=True)
    dtype, reason = resolve_dtype("auto", "cpu")
    assert dtype == "bfloat16" and "AMX" in reason


def test_cpu_without_the_probes_falls_back_to_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    dtype, reason = resolve_dtype("auto", "cpu")
    assert dtype == "float32" and "no bf16 probe" in reason


def test_no_device_means_cpu(monkeypatch):
    mock_cpu(monkeypatch, "AVX2")
    assert resolve_dtype("auto") == resolve_dtype("auto", torch.device("cpu"))


def test_cuda_with_native_bf16_gets_bfloat16(monkeypatch):
    calls = mock_cuda(monkeypatch, bf16=True)
    mock_cpu(monkeypatch, "AVX2")  # the host CPU does not matter for a GPU
    dtype, reason = resolve_dtype("auto", "cuda")
    assert dtype == "bfloat16" and "CUDA" in reason
    # emulated bf16 (pre-Ampere) must not count as support
    assert calls == [{"including_emulation": False}]


def test_cuda_without_bf16_gets_float32_not_float16(monkeypatch):
    mock_cuda(monkeypatch, bf16=False)
    mock_cpu(monkeypatch, "AVX512", avx512_bf16=True)
    dtype, reason = resolve_dtype("auto", torch.device("cuda"))
    assert dtype == "float32"  # float16 overflows in scoring (score.py refuses non-finite scores)
    assert "without native bfloat16" in reason and "float16" in reason


def test_other_device_types_get_float32():
    assert resolve_dtype("auto", "meta")[0] == "float32"


@pytest.mark.parametrize("dtype", EXPLICIT)
def test_explicit_dtypes_pass_through_unchanged(monkeypatch, dtype):
    for cpu in [dict(capability="AVX2"), dict(capability="AVX512", avx512_bf16=True, amx=True)]:
        mock_cpu(monkeypatch, **cpu)
        for bf16 in (True, False):
            mock_cuda(monkeypatch, bf16=bf16)
            for device in ("cpu", "cuda", None):
                got, reason = resolve_dtype(dtype, device)
                assert got == dtype and "explicitly" in reason
    assert planned_dtype(dtype)[0] == dtype


def test_planned_gpu_dtype_for_auto_is_bfloat16_and_says_so():
    dtype, reason = planned_dtype("auto")
    assert dtype == "bfloat16" and "assuming a bf16-capable GPU" in reason


# ---------------------------------------------------------------- config


def test_auto_is_the_default_and_validates():
    assert ModelConfig().dtype == "auto"
    assert load_config().model.dtype == "auto"
    for d in ("auto", *EXPLICIT):
        assert load_config(overrides=[f"model.dtype={d}"]).model.dtype == d


def test_invalid_dtype_is_rejected_naming_the_field():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.dtype=fp8"])
    assert str(err.value) == "model.dtype: expected one of ['auto', 'bfloat16', 'float16', 'float32'], got 'fp8'"


def test_nf4_with_auto_validates():
    assert load_config(overrides=["model.quantization=nf4", "model.dtype=auto"]).model.dtype == "auto"


def test_recipes_cpu_auto_gpu_bfloat16():
    assert load_config(CONFIGS / "smollm2_cpu.yaml").model.dtype == "auto"
    for name in ("qwen3_4b_qlora.yaml", "llamarec_llama2_7b.yaml"):
        assert load_config(CONFIGS / name).model.dtype == "bfloat16", name


# ---------------------------------------------------------------- readers of model.dtype


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_dtype")
    return build_tiny_model(root / "llama", "llama", build_bytelevel_bpe(root / "tok"))


def test_auto_on_a_mocked_avx2_cpu_loads_float32_weights(monkeypatch, tiny_llama, caplog):
    mock_cpu(monkeypatch, "AVX2")
    assert resolve_dtype("auto", "cpu")[0] == "float32"  # precondition: the mock took effect
    cfg = ModelConfig(name_or_path=str(tiny_llama), dtype="auto", lora_dropout=0.0)
    with caplog.at_level(logging.INFO, logger="rerank_dist.modeling"):
        model = M.load_model(cfg, training=True)
    assert {p.dtype for p in model.get_base_model().parameters()} == {torch.float32}
    assert "float32: CPU AVX2 without native bfloat16" in caplog.text  # the loader logs choice and reason


def test_auto_on_a_mocked_bf16_cpu_loads_bfloat16_weights(monkeypatch, tiny_llama):
    mock_cpu(monkeypatch, "AVX512", avx512_bf16=True)
    cfg = ModelConfig(name_or_path=str(tiny_llama), dtype="auto")
    model = M.load_model(cfg, training=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_nf4_compute_dtype_follows_the_resolved_dtype(monkeypatch):
    pytest.importorskip("bitsandbytes")
    cfg = ModelConfig(quantization="nf4", dtype="auto")
    mock_cpu(monkeypatch, "AVX2")
    assert M._quantization_config(cfg, device="cpu").bnb_4bit_compute_dtype == torch.float32
    mock_cpu(monkeypatch, "AVX512", avx512_bf16=True)
    assert M._quantization_config(cfg, device="cpu").bnb_4bit_compute_dtype == torch.bfloat16


def test_export_auto_follows_the_dtype_training_resolved(monkeypatch):
    from rerank_dist.export import merged_dtype

    auto = ExportConfig(dtype="auto")
    for quant in ("none", "nf4"):
        m = ModelConfig(quantization=quant, dtype="auto")
        assert merged_dtype(m, auto, trained="float32") == torch.float32
        assert merged_dtype(m, auto, trained="bfloat16") == torch.bfloat16
        # an explicit model.dtype wins over whatever a summary says
        explicit = dataclasses.replace(m, dtype="float32")
        assert merged_dtype(explicit, auto, trained="bfloat16") == torch.float32
    # no train summary: resolved as training on this machine would
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mock_cpu(monkeypatch, "AVX2")
    assert merged_dtype(ModelConfig(dtype="auto"), auto) == torch.float32
    mock_cpu(monkeypatch, "AVX512", avx512_bf16=True)
    assert merged_dtype(ModelConfig(dtype="auto"), auto) == torch.bfloat16


def test_memory_estimate_takes_auto_as_a_bf16_gpu_and_says_so():
    import json

    from rerank_dist.memory import estimate_training_memory

    arch = json.loads((CONFIGS / "models/qwen3-4b/config.json").read_text())
    for quant in ("none", "nf4"):
        auto = estimate_training_memory(arch, ModelConfig(dtype="auto", quantization=quant), 1, 64)
        bf16 = estimate_training_memory(arch, ModelConfig(dtype="bfloat16", quantization=quant), 1, 64)
        assert auto["total"] == bf16["total"] and auto["dtype"] == "bfloat16"
        assert "assuming a bf16-capable GPU" in auto["summary"]
        assert "assuming" not in bf16["summary"]


def test_dry_run_on_an_avx2_cpu_resolves_auto_to_float32(monkeypatch):
    from rerank_dist.plan import dry_run_lines, plan_for

    mock_cpu(monkeypatch, "AVX2")
    cfg = load_config(overrides=["model.dtype=auto"], world_size=1)
    lines = dry_run_lines(cfg, plan_for(cfg, 1), cpu=True)
    precision = next(line for line in lines if line.startswith("precision: "))
    assert precision.startswith("precision: weights float32 (CPU AVX2 without native bfloat16")


def test_score_progress_key_hashes_the_resolved_dtype(monkeypatch, tmp_path):
    from rerank_dist.saved_scores import progress_key

    (tmp_path / "adapter_model.safetensors").write_bytes(b"adapter")
    labels = torch.tensor([1, 2, 3])

    def key(dtype: str) -> str:
        cfg = RunConfig()
        cfg.model.dtype = dtype
        return progress_key(cfg, tmp_path, "test", [[1, 2], [3]], labels, "cpu")

    mock_cpu(monkeypatch, "AVX2")
    on_avx2 = key("auto")
    assert on_avx2 == key("float32")  # auto hashes as what it resolved to
    mock_cpu(monkeypatch, "AVX512", avx512_bf16=True)
    assert key("auto") == key("bfloat16") != on_avx2  # another machine's scores are not mixed in


def test_train_summary_and_score_metrics_record_the_dtype(trained_run):
    from rerank_dist.io import read_json
    from rerank_dist.paths import RunPaths

    paths = RunPaths(trained_run[0])  # trained with model.dtype=float32 (tests/conftest.py)
    summary = read_json(paths.ranker / "train_summary.json")
    assert summary["dtype"] == "float32" and summary["dtype_reason"] == "model.dtype=float32 set explicitly"
    assert read_json(paths.metrics("test"))["dtype"] == "float32"
