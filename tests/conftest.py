"""Fixtures shared across test modules: the two locally built tokenizer styles, a tiny random Llama, and one
finished run of every stage on the bundled data with it (each built once per session)."""

from pathlib import Path

import pytest

from rerank_dist.cli import main
from tests.tiny_models import build_tiny_model
from tests.tiny_tokenizers import build_bytelevel_bpe, build_sentencepiece_like


@pytest.fixture(scope="session")
def bpe(tmp_path_factory):
    """Byte-level BPE (GPT-2 / SmolLM2 / Qwen style)."""
    return build_bytelevel_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def spm(tmp_path_factory):
    """Sentencepiece-like (Llama-2 style)."""
    return build_sentencepiece_like(tmp_path_factory.mktemp("spm"))


def run_overrides(run_dir: Path, model_dir: Path, **extra: str) -> list[str]:
    base = {
        "run_dir": str(run_dir),
        "retriever.embed_dim": "16", "retriever.max_epochs": "1", "retriever.max_len": "50",
        "retriever.batch_size": "64", "retriever.max_minutes": "0",
        "prompt.history_items": "5", "prompt.title_max_tokens": "8", "prompt.max_train_examples": "24",
        # Shuffled training: the doctor's planted faults (answers mostly "A", random negatives) are faults
        # under this protocol; retriever-order training is covered in test_examples and test_doctor_checks.
        "prompt.train_order": "shuffled",
        "model.name_or_path": str(model_dir), "model.lora_r": "4", "model.dtype": "float32",
        "train.batch_size": "4", "train.micro_batch_size": "2", "train.warmup_steps": "1",
        "train.lr": "1e-2", "train.max_steps": "4", "train.eval_every": "2", "train.eval_users": "16",
        "train.save_every": "2", "score.batch_size": "16",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_llama")
    tok = build_bytelevel_bpe(root / "tok")
    return build_tiny_model(root / "model", "llama", tok)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, model_dir) -> tuple[Path, list[str]]:
    """prepare -> retrieve -> train -> score -> report once; tests read (or copy) its outputs, never change them."""
    run_dir = tmp_path_factory.mktemp("run")
    overrides = run_overrides(run_dir, model_dir)
    assert main(["run", *overrides]) == 0
    return run_dir, overrides
