"""Training LRURec the way LlamaRec does, bounded by a wall-clock budget.

Protocol: train on seq[:-2] of every user (long sequences cut into max_len windows from the
end), full-softmax cross-entropy over the whole catalogue at every position, AdamW (lr 1e-3,
wd 0.01 except biases and LayerNorms, eps 1e-9), gradient norm clipped at 5. After each
validation interval the model ranks seq[-2] over the whole catalogue (history excluded) from
seq[:-2]; the weights with the best Recall@10 are kept (the newer on a tie); training stops
after `patience` validations below the best, after max_epochs, or when `max_minutes` have passed.

Optionally (`ema_decay` > 0), what is validated and kept is an exponential moving average of the
weights, updated after every optimizer step. On ml-latest-small the average ranks better than the
raw weights at almost every epoch (test Recall@10 about +.009 over epochs 25-38, 4 seeds), but the
raw weights' epoch-to-epoch swings are partly real, so picking their best epoch on validation
recovers about as much: after selection both end within noise of each other (bench numbers in
docs/DESIGN.md). The default is therefore LlamaRec's: the raw weights.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from rerank_dist.config import RetrieverConfig
from rerank_dist.metrics import metrics_from_ranks
from rerank_dist.retrieval.lrurec import LRURec
from rerank_dist.retrieval.scoring import full_catalogue_ranks
from rerank_dist.retrieval.sequences import retriever_training_sequences, training_windows, window_batch

MAX_GRAD_NORM = 5.0
ADAM_EPS = 1e-9


@dataclass
class TrainSummary:
    best_epoch: int = 0
    best_val: dict = field(default_factory=dict)
    epochs: int = 0
    steps: int = 0
    minutes: float = 0.0
    stopped_by: str = "max_epochs"
    epoch_losses: list = field(default_factory=list)  # mean training loss of every epoch
    history: list = field(default_factory=list)  # one record per validation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: RetrieverConfig) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if "bias" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, eps=ADAM_EPS)


def next_item_loss(model: LRURec, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all positions that have a label (label 0 = padding, skipped).

    Scores are computed only at labelled positions: same loss, less work on padding.
    """
    hidden = model.hidden(tokens)  # (B, L, D)
    has_label = labels > 0  # (B, L)
    logits = model.scores_from_hidden(hidden[has_label])  # (N, V+1)
    return F.cross_entropy(logits, labels[has_label])


def validation_examples(sequences: Mapping[int, Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """Histories seq[:-2] and targets seq[-2] for every user long enough to have both."""
    users = [u for u in sorted(sequences) if len(sequences[u]) >= 3]
    return [list(sequences[u][:-2]) for u in users], [sequences[u][-2] for u in users]


def evaluate(model: LRURec, histories: Sequence[Sequence[int]], targets: Sequence[int],
             max_len: int) -> dict[str, float]:
    ranks = full_catalogue_ranks(model, histories, targets, max_len)
    return metrics_from_ranks(ranks, ks=(10,))


def train_retriever(cfg: RetrieverConfig, sequences: Mapping[int, Sequence[int]], num_items: int,
                    log: Callable[[str], None] = print, progress: bool = True,
                    held_out: int = 2, device: str | torch.device = "cpu") -> tuple[LRURec, TrainSummary]:
    """Train from scratch on seq[:-held_out] of every user (default: all but the validation and test
    targets); return the best-validation model (eval mode, on `device`). Validation is always seq[-2]
    from seq[:-2]. device: where the model and its batches live (the stage picks a GPU when present)."""
    seed_everything(cfg.seed)
    # Built on the CPU, then moved: the initial weights are the same draw on every device.
    model = LRURec.from_config(cfg, num_items).to(device)
    optimizer = make_optimizer(model, cfg)
    # The weights that are validated and kept: the running average, or the raw weights themselves.
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay else None
    kept = averaged.module if averaged is not None else model
    windows = training_windows(retriever_training_sequences(sequences, held_out), cfg.max_len)
    if not windows:
        raise ValueError(f"no user has more than {held_out} items: nothing to train the retriever on")
    val_histories, val_targets = validation_examples(sequences)
    order_rng = torch.Generator().manual_seed(cfg.seed)
    summary = TrainSummary()
    best_state, bad_validations, start = None, 0, time.monotonic()
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes > 0 else float("inf")
    log(f"retriever: {len(windows)} training windows (seq[:-{held_out}]) from {len(sequences)} users, {num_items} items, "
        f"{len(val_targets)} validation users, budget {cfg.max_minutes:g} min, on {torch.device(device)}"
        + (f", validating the weight average (decay {cfg.ema_decay:g})" if averaged is not None else ""))

    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        order = torch.randperm(len(windows), generator=order_rng).tolist()
        batches = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        losses = []
        bar = tqdm(batches, desc=f"retriever epoch {epoch}", leave=False, disable=not progress)
        for batch in bar:
            tokens, labels = window_batch([windows[i] for i in batch], cfg.max_len)  # (B, L) each
            tokens, labels = tokens.to(device), labels.to(device)
            loss = next_item_loss(model, tokens, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            if averaged is not None:
                averaged.update_parameters(model)
            losses.append(loss.item())
            summary.steps += 1
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            if time.monotonic() > deadline:
                summary.stopped_by = "time_budget"
                break
        summary.epochs = epoch
        summary.epoch_losses.append(float(np.mean(losses)))
        out_of_time = summary.stopped_by == "time_budget"
        if epoch % cfg.eval_every_epochs and not out_of_time and epoch != cfg.max_epochs:
            continue

        val = evaluate(kept, val_histories, val_targets, cfg.max_len)
        # Ties go to the newer weights: Recall@10 moves in steps of 1/#users, so ties are common,
        # and a later average has seen more training.
        improved = best_state is None or val["recall@10"] >= summary.best_val["recall@10"]
        if improved:
            best_state = copy.deepcopy(kept.state_dict())
            summary.best_epoch, summary.best_val, bad_validations = epoch, val, 0
        else:
            bad_validations += 1
        elapsed = (time.monotonic() - start) / 60
        record = {"epoch": epoch, "loss": summary.epoch_losses[-1], **{f"val_{k}": v for k, v in val.items()},
                  "minutes": elapsed}
        summary.history.append(record)
        log(f"retriever epoch {epoch:3d}  loss {record['loss']:.4f}  val recall@10 {val['recall@10']:.4f}  "
            f"ndcg@10 {val['ndcg@10']:.4f}  elapsed {elapsed:.1f} min{'  *best' if improved else ''}")
        if out_of_time:
            break
        if bad_validations >= cfg.patience:
            summary.stopped_by = "early_stopping"
            break

    model.load_state_dict(best_state)
    model.eval()
    summary.minutes = (time.monotonic() - start) / 60
    log(f"retriever: stopped by {summary.stopped_by} after {summary.epochs} epochs ({summary.minutes:.1f} min); "
        f"best epoch {summary.best_epoch} val recall@10 {summary.best_val['recall@10']:.4f}")
    return model, summary
