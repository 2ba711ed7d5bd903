"""Saving and loading a trained retriever: ``model.safetensors`` + ``config.json``.

``config.json`` is removed before the weights are written and written after them, so its
presence marks a complete checkpoint: a run killed in between leaves no config and the
checkpoint is not trusted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors.torch import load_file, save_file

from rerank_dist.config import RetrieverConfig
from rerank_dist.io import atomic_path, read_json, write_json
from rerank_dist.retrieval.lrurec import LRURec

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Fields that only shape candidate generation: changing them does not require retraining.
_NOT_TRAINING = {"top_k", "train_prefixes_per_user", "train_candidates"}


def save_retriever(model: LRURec, cfg: RetrieverConfig, out_dir: str | Path, held_out: int = 2) -> None:
    """held_out: how many trailing items of each user the model was not trained on (2 = val + test)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}  # from any device
    with atomic_path(out_dir / MODEL_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / CONFIG_FILE, {"retriever": dataclasses.asdict(cfg), "num_items": model.num_items,
                                       "held_out": held_out})


def read_retriever_config(ckpt_dir: str | Path) -> tuple[RetrieverConfig, int]:
    """The RetrieverConfig and num_items a checkpoint was trained with."""
    raw = read_json(Path(ckpt_dir) / CONFIG_FILE)
    return RetrieverConfig(**raw["retriever"]), int(raw["num_items"])


def load_retriever(ckpt_dir: str | Path) -> LRURec:
    """Rebuild the model from config.json and load its weights (eval mode)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / CONFIG_FILE).is_file() or not (ckpt_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no complete retriever checkpoint ({MODEL_FILE} + {CONFIG_FILE})")
    cfg, num_items = read_retriever_config(ckpt_dir)
    model = LRURec.from_config(cfg, num_items)
    model.load_state_dict(load_file(str(ckpt_dir / MODEL_FILE)))
    return model.eval()


def checkpoint_matches(ckpt_dir: str | Path, cfg: RetrieverConfig, num_items: int, held_out: int = 2) -> bool:
    """True when ckpt_dir holds a complete checkpoint trained with the same settings, catalogue and
    held-out items."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / CONFIG_FILE).is_file() or not (ckpt_dir / MODEL_FILE).is_file():
        return False
    # Compared as saved, not through RetrieverConfig: a checkpoint from before a field existed
    # lacks it and must not inherit today's default.
    raw = read_json(ckpt_dir / CONFIG_FILE)
    return (int(raw["num_items"]) == num_items and raw.get("held_out", 2) == held_out
            and _training_fields(raw["retriever"]) == _training_fields(dataclasses.asdict(cfg)))


def _training_fields(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if k not in _NOT_TRAINING}
