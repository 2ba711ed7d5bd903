"""Checkpoints: directories named by step, written atomically, that resume exactly.

``step-000200/`` holds the LoRA adapter (safetensors), the optimizer and scheduler state, the
resolved config, the verbalizer (labels and their token ids) and ``trainer_state.json``. ``best/``
holds the adapter with the best validation NDCG@10, and is what the scorer reloads (peft adds a
README.md model card beside it). A directory
appears only once complete (temp dir + rename), so the newest ``step-*`` is always loadable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from rerank_dist.config import RunConfig, save_config
from rerank_dist.io import atomic_dir, read_json, write_json

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STEP_FILES = {"README.md", "adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
              "trainer_state.json", "config.yaml", "verbalizer.json"}
BEST_FILES = {"README.md", "adapter_model.safetensors", "adapter_config.json", "config.yaml", "verbalizer.json"}


def save_adapter(model, out: Path, cfg: RunConfig, verbalizer: dict[str, Any]) -> None:
    """Adapter weights as safetensors plus what is needed to score them again."""
    model.save_pretrained(out, safe_serialization=True)
    save_config(cfg, out / "config.yaml")
    write_json(out / "verbalizer.json", verbalizer)


def save_best(model, path: Path, cfg: RunConfig, verbalizer: dict[str, Any]) -> None:
    with atomic_dir(path) as tmp:
        save_adapter(model, tmp, cfg, verbalizer)


def save_step(model, optimizer, scheduler, path: Path, cfg: RunConfig, verbalizer: dict[str, Any],
              state: dict[str, Any]) -> None:
    with atomic_dir(path) as tmp:
        save_adapter(model, tmp, cfg, verbalizer)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json(tmp / "trainer_state.json", state)


def latest_step_dir(ranker_dir: Path) -> Path | None:
    """Newest complete step-NNNNNN/ directory, or None."""
    if not ranker_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ranker_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    found = [(s, p) for s, p in found if (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def load_step(step_dir: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore adapter weights, optimizer and scheduler in place; return the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(step_dir / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"{step_dir}/adapter_model.safetensors: keys the model does not have: {unexpected[:3]}")
    # weights_only: optimizer/scheduler state is tensors and plain containers; never unpickle code.
    optimizer.load_state_dict(torch.load(step_dir / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(step_dir / "scheduler.pt", weights_only=True))
    return read_json(step_dir / "trainer_state.json")
