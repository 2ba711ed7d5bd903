"""Fixtures shared across test modules: the two locally built tokenizer styles (built once per session)."""

import pytest

from tests.tiny_tokenizers import build_bytelevel_bpe, build_sentencepiece_like


@pytest.fixture(scope="session")
def bpe(tmp_path_factory):
    """Byte-level BPE (GPT-2 / SmolLM2 / Qwen style)."""
    return build_bytelevel_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def spm(tmp_path_factory):
    """Sentencepiece-like (Llama-2 style)."""
    return build_sentencepiece_like(tmp_path_factory.mktemp("spm"))
