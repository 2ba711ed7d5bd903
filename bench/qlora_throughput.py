"""Throughput and memory of the ranker on a real architecture with random weights.

    python bench/qlora_throughput.py --arch configs/models/qwen3-4b --out runs/bench/qwen3-4b.json
    python bench/qlora_throughput.py --arch configs/models/qwen3-4b --tiny   # CPU smoke run, minutes

Random weights cost the same time and memory as trained ones, so no download is needed: the
architecture's config.json is instantiated, saved once as safetensors, and loaded back through
``rerank_dist.modeling`` with 4-bit NF4 QLoRA (the path users run). Prompts are random token ids of
the length real prompts have (``--prompt-tokens``); training uses the same answer-position loss as
``train.py`` and scoring the same ``label_logits`` as ``score.py``.

Reports training tokens/s and steps/s, scoring prompts/s, and peak accelerator memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/random_model.py


def _random_checkpoint(arch_dir: Path, out: Path, tiny: bool) -> Path:
    from random_model import save_random_model

    return save_random_model(arch_dir, out, tiny)


def _batches(n: int, batch: int, length: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(0, n, batch):
        ids = torch.randint(10, vocab, (batch, length), generator=g)  # (B, L)
        yield ids, torch.ones_like(ids), torch.randint(0, 20, (batch,), generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="configs/models/qwen3-4b", help="directory with config.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--score-prompts", type=int, default=200)
    parser.add_argument("--score-batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=640, help="SmolLM2 prompts average ~620 tokens")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--tiny", action="store_true", help="shrink the architecture (CPU smoke run)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    from rerank_dist.config import ModelConfig
    from rerank_dist.label_scoring import label_logits
    from rerank_dist.modeling import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        ckpt = _random_checkpoint(Path(args.arch), Path(tmp) / "model", args.tiny)
        cfg = ModelConfig(name_or_path=str(ckpt), gguf_fallback=False, dtype="bfloat16",
                          quantization=args.quantization, lora_r=8, lora_alpha=32,
                          lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          gradient_checkpointing=device.type == "cuda")
        model = load_model(cfg, training=True, device=device)
        load_s = time.time() - started
    vocab = model.config.vocab_size
    label_ids = torch.arange(100, 120, device=device)  # (K,) any 20 distinct ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # --- training: warm up one step, then time the rest
    steps = list(_batches(args.steps * args.micro_batch, args.micro_batch, args.prompt_tokens, vocab, 0))
    timed_tokens, t0 = 0, None
    for i, (ids, mask, target) in enumerate(steps):
        if i == 1:
            sync()
            t0 = time.time()
        logits = label_logits(model, ids.to(device), mask.to(device), label_ids)  # (B, K)
        loss = F.cross_entropy(logits, target.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 1:
            timed_tokens += ids.numel()
    sync()
    train_s = time.time() - t0
    train_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    # --- scoring
    model.eval()
    prompts = list(_batches(args.score_prompts, args.score_batch, args.prompt_tokens, vocab, 1))
    with torch.no_grad():
        label_logits(model, prompts[0][0].to(device), prompts[0][1].to(device), label_ids)  # warm-up
        sync()
        t1 = time.time()
        scored = 0
        for ids, mask, _ in prompts:
            label_logits(model, ids.to(device), mask.to(device), label_ids)
            scored += len(ids)
        sync()
    score_s = time.time() - t1
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "arch": args.arch, "tiny": args.tiny, "quantization": args.quantization,
        "prompt_tokens": args.prompt_tokens, "micro_batch": args.micro_batch,
        "load_seconds": round(load_s, 1),
        "train_steps_timed": len(steps) - 1, "train_tokens_per_s": round(timed_tokens / train_s, 1),
        "train_s_per_step": round(train_s / max(len(steps) - 1, 1), 3),
        "score_prompts": scored, "score_prompts_per_s": round(scored / score_s, 2),
        "peak_memory_gib_train": round(train_peak, 2),
        "peak_memory_gib_total": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        from rerank_dist.io import write_json

        write_json(args.out, result)


if __name__ == "__main__":
    main()
