"""A real architecture with random weights and a locally built tokenizer, saved as a model directory.

    python bench/random_model.py --arch configs/models/qwen3-4b --out /tmp/qwen3-4b-random --device cuda
    python bench/random_model.py --arch configs/models/qwen3-4b --out /tmp/tiny --tiny     # CPU smoke run

Random weights cost the same time and memory as trained ones, so no download is needed. The tokenizer
is the small byte-level BPE the tests build (tests/tiny_tokenizers.py); its ids are a subset of the
architecture's vocabulary, and it cuts titles into more tokens than the real one does, so prompts are
at least as long as real ones (they are capped by prompt.max_prompt_tokens either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# tiny: the same code path, small enough for a CPU (passed at construction so derived fields follow)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=2048)


def save_random_model(arch_dir: Path, out: Path, tiny: bool = False, device: str = "cpu") -> Path:
    """bfloat16 random weights of arch_dir/config.json (seeded) and a local tokenizer, in out/."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tiny_tokenizers import build_bytelevel_bpe

    fields = {**json.loads((arch_dir / "config.json").read_text()), **(TINY if tiny else {})}
    config = AutoConfig.for_model(**fields)
    torch.manual_seed(0)
    with torch.device(device):  # initialising billions of weights is seconds on a GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer = build_bytelevel_bpe(out / "tokenizer")
    assert len(tokenizer) <= config.vocab_size, "the tokenizer's ids must fit the embedding"
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="configs/models/qwen3-4b", help="directory with config.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="shrink the architecture (CPU smoke run)")
    args = parser.parse_args()
    started = time.time()
    save_random_model(Path(args.arch), Path(args.out), args.tiny, args.device)
    print(f"random {args.arch} ({'tiny' if args.tiny else 'full size'}) saved to {args.out} "
          f"in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
