"""Distributed batched scorer.

The prompts are cut into batches first, by length so that a batch pads little, and those same
batches are then shared out between the processes (``split_between_processes``): a prompt is scored
in the same batch, with the same padding, whatever the number of processes, so 1 and N processes
give bit-identical scores. Rows are left-padded so the answer position is the last one, and logits
are taken only there and only for the label tokens. Shards are gathered (``gather_object``) and put
back in input order.

``score_split`` is the test-time entry point: it always reloads the saved adapter from disk, so
what gets scored is exactly what was saved. It can stop and resume: every process saves the scores
it has made to ``scores/<split>/`` on a preemption signal (``preemption.py``, agreed between batches
like training's steps) and every ``train.save_every_minutes``; a rerun scores only the batches not
saved yet, and the result equals an unbroken run's bit for bit (same batches, same padding).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from rerank_dist import preemption
from rerank_dist.config import RunConfig, labels_for
from rerank_dist.io import atomic_path, read_json, write_json, write_parquet
from rerank_dist.label_scoring import label_logits, left_pad
from rerank_dist.metrics import ranking_report, target_ranks
from rerank_dist.paths import RunPaths


def _batches(token_lists: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches that do not depend on the number of processes.

    Sorted by length so each batch pads little; then put in a fixed pseudo-random order, so that the
    contiguous share each process gets mixes long and short batches rather than all the long ones.
    """
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]), reverse=True)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return [batches[j] for j in np.random.default_rng(0).permutation(len(batches))]


@torch.no_grad()
def _score_batches(model, token_lists, batches, label_ids, pad_id, device, show,
                   idle_passes: list[list[int]] = ()) -> list[tuple[int, list[float]]]:
    """(prompt index, K scores) for every prompt in batches; idle_passes are run and their scores dropped."""
    batches = sorted(batches, key=lambda b: len(token_lists[b[0]]), reverse=True)  # longest first: OOM shows at once
    out: list[tuple[int, list[float]]] = []
    bar = tqdm(total=sum(map(len, batches)), desc="scoring", unit="prompt", disable=not show, dynamic_ncols=True)
    for batch in batches:
        input_ids, attention_mask = left_pad([token_lists[i] for i in batch], pad_id)  # (B, L), (B, L)
        logits = label_logits(model, input_ids.to(device), attention_mask.to(device), label_ids.to(device))  # (B, K)
        for i, row in zip(batch, logits.float().cpu().tolist()):
            out.append((i, row))
        bar.update(len(batch))
    bar.close()
    for batch in idle_passes:
        input_ids, attention_mask = left_pad([token_lists[i] for i in batch], pad_id)  # (B, L), (B, L)
        label_logits(model, input_ids.to(device), attention_mask.to(device), label_ids.to(device))
    return out


def score_prompts(accelerator: Accelerator, model, token_lists: list[list[int]], label_ids: torch.Tensor,
                  pad_id: int, batch_size: int, lockstep: bool = False) -> np.ndarray:
    """Label scores for every prompt, in input order: (N, K) float32. All processes must call this.

    lockstep: every process runs the same number of forward passes (a process with fewer batches
    repeats one and drops its scores). Needed when the weights are sharded (ZeRO-3, FSDP): each
    forward gathers them from all processes, so one process with an extra batch would wait forever.

    Raises RuntimeError when a prompt's scores did not come back from the shards, and (a different
    message) when the model produced NaN or inf scores for some prompt.
    """
    was_training = model.training
    model.eval()
    batches = _batches(token_lists, batch_size)
    with accelerator.split_between_processes(batches) as mine:
        mine = list(mine)
        extra = math.ceil(len(batches) / accelerator.num_processes) - len(mine) if lockstep else 0
        local = _score_batches(model, token_lists, mine, label_ids, pad_id, accelerator.device,
                               accelerator.is_local_main_process, idle_passes=[batches[-1]] * extra)
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    if was_training:
        model.train()
    scores = np.zeros((len(token_lists), len(label_ids)), dtype=np.float32)
    filled = np.zeros(len(token_lists), dtype=bool)  # which prompts came back from the shards
    for i, row in gathered:
        scores[i] = row
        filled[i] = True
    if not filled.all():
        missing = int((~filled).sum())
        raise RuntimeError(f"scoring lost {missing} of {len(token_lists)} prompts while gathering shards")
    non_finite = int((~np.isfinite(scores)).any(axis=1).sum())
    if non_finite:
        dtype = getattr(model, "dtype", None)
        raise RuntimeError(
            f"the model produced non-finite label scores (NaN or inf) for {non_finite} of {len(token_lists)} "
            f"prompts{f' (model dtype {dtype})' if dtype is not None else ''}; float16 activations overflow "
            f"easily: use model.dtype=bfloat16 or float32 (and no fp16 mixed precision)")
    return scores


def baseline_scores(examples, seed: int) -> dict[str, np.ndarray]:
    """Scores that reproduce the retriever's order and a random order on the same displayed candidates."""
    retriever = np.array([[-p for p in ex.retriever_positions] for ex in examples], dtype=np.float64)  # (N, K)
    rng = np.random.default_rng(seed)
    random = rng.random(retriever.shape)  # (N, K)
    return {"retriever_order": retriever, "random_order": random}


def evaluate_scores(examples, scores: np.ndarray, seed: int, ks=(1, 5, 10)) -> dict:
    """Reranker metrics next to the retriever-order and random-order baselines on the same candidates."""
    target_index = np.array([ex.label_index for ex in examples])
    num_candidates = scores.shape[1]
    report = {"reranker": ranking_report(target_ranks(scores, target_index), num_candidates, ks)}
    for name, base in baseline_scores(examples, seed).items():
        report[name] = ranking_report(target_ranks(base, target_index), num_candidates, ks)
    return report


def rankings_frame(examples, scores: np.ndarray) -> pd.DataFrame:
    """One row per user: displayed candidates, their scores, the reranked list and the target's rank."""
    ranks = target_ranks(scores, np.array([ex.label_index for ex in examples]))
    ranked = np.argsort(-scores, axis=1, kind="stable")  # (N, K) best first
    return pd.DataFrame({
        "user": [ex.user for ex in examples],
        "prefix_len": [ex.prefix_len for ex in examples],
        "target": [ex.target for ex in examples],
        "candidates": [list(ex.candidate_ids) for ex in examples],
        "scores": [row.tolist() for row in scores],
        "reranked": [[ex.candidate_ids[j] for j in order] for ex, order in zip(examples, ranked)],
        "target_rank": ranks,
        "retriever_rank": [ex.retriever_positions[ex.label_index] if ex.label_index >= 0 else -1 for ex in examples],
    })


def score_split(cfg: RunConfig, split: str) -> dict:
    """Reload the best adapter from disk, score every user of ``split``, write rankings and metrics."""
    from rerank_dist.data.prepare import load_dataset
    from rerank_dist.distributed import build_accelerator, describe, peak_memory_gib
    from rerank_dist.examples import build_examples, tokenize_examples
    from rerank_dist.modeling import load_for_scoring, load_tokenizer

    paths = RunPaths(Path(cfg.run_dir))
    accelerator = build_accelerator(cfg)
    accelerator.print(describe(accelerator))
    adapter_dir = paths.best
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no saved adapter (adapter_model.safetensors); run the train stage first")
    verbalizer = read_json(adapter_dir / "verbalizer.json")
    labels = labels_for(cfg)
    if verbalizer["labels"] != labels:
        raise ValueError(f"{adapter_dir}/verbalizer.json: trained with labels {verbalizer['labels']}, config asks for {labels}")

    started = time.time()
    tokenizer = load_tokenizer(cfg.model)
    dataset = load_dataset(paths.data)
    candidates = pd.read_parquet(paths.candidates(split))
    if cfg.score.max_users:
        candidates = candidates.head(cfg.score.max_users)
    examples, stats = build_examples(candidates, dataset, cfg.prompt, labels, tokenizer, split, dataset.num_items)
    token_lists = tokenize_examples(examples, tokenizer)
    label_ids = torch.tensor(verbalizer["label_ids"], dtype=torch.long)
    model = load_for_scoring(cfg.model, adapter_dir, device=accelerator.device)

    saved = SavedScores(paths.scores(split), len(token_lists), len(label_ids))
    if accelerator.is_main_process:
        saved.start(_progress_key(cfg, adapter_dir, split, token_lists, label_ids), accelerator.print)
    accelerator.wait_for_everyone()
    saved.load()
    if saved.count and accelerator.is_main_process:  # one line for the job, not one per node
        print(f"[score] {split}: resuming, {saved.count} of {len(token_lists)} prompts already scored", flush=True)
    scoring_started = time.time()
    with accelerator.autocast():  # train.mixed_precision, as validation during training saw the model
        scores = score_resumable(accelerator, model, token_lists, label_ids, tokenizer.pad_token_id,
                                 cfg.score.batch_size, saved, cfg.train.save_every_minutes * 60)
    scoring_seconds = time.time() - scoring_started
    result = {}
    if accelerator.is_main_process:
        result = evaluate_scores(examples, scores, seed=cfg.prompt.seed)
        result["split"] = split
        result["adapter"] = str(adapter_dir)
        result["adapter_step"] = verbalizer.get("step")
        result["world_size"] = accelerator.num_processes
        result["scored_all_users"] = not cfg.score.max_users
        result["prompt_stats"] = stats
        result["seconds"] = round(time.time() - started, 1)  # with loading the model and building prompts
        result["scoring_seconds"] = round(scoring_seconds, 2)  # the forward passes and the gather alone
        result["resumed_prompts"] = saved.count  # scored by an earlier, preempted run of this stage
        result["prompts_per_second"] = round((len(examples) - saved.count) / max(scoring_seconds, 1e-9), 3)
        result["peak_memory_gib"] = peak_memory_gib(accelerator.device)
        write_parquet(paths.rankings(split), rankings_frame(examples, scores))
        write_json(paths.metrics(split), result)
        saved.remove()  # the rankings hold every score now
    accelerator.wait_for_everyone()
    return result


# ---------------------------------------------------------------- resumable scoring


class SavedScores:
    """Scores saved by runs of score_split that were stopped: ``scores/<split>/part-*.npz``, each one
    process's prompts since its previous save, valid for the inputs named by ``progress.json``."""

    def __init__(self, directory: Path, num_prompts: int, num_labels: int) -> None:
        self.directory = directory
        self.scores = np.zeros((num_prompts, num_labels), dtype=np.float32)  # (N, K)
        self.mask = np.zeros(num_prompts, dtype=bool)  # which prompts have saved scores

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    def start(self, key: str, say) -> None:
        """Main process: keep saved scores made from these inputs (key), discard any others."""
        progress = self.directory / "progress.json"
        recorded = read_json(progress).get("key") if progress.is_file() else None
        if recorded != key and self.directory.exists():
            if recorded is not None:
                say(f"{self.directory}: saved scores from another adapter or other prompts; discarded")
            shutil.rmtree(self.directory)
        if recorded != key:
            write_json(progress, {"key": key, "prompts": len(self.mask)})

    def load(self) -> None:
        """Every process: read all saved parts. A prompt saved twice means two runs overlapped: refused."""
        for part in sorted(self.directory.glob("part-*.npz")):
            with np.load(part) as data:
                index, rows = data["index"], data["scores"]
            if self.mask[index].any():
                raise RuntimeError(f"{part}: holds prompts already saved in another part; delete "
                                   f"{self.directory} and score again")
            self.scores[index], self.mask[index] = rows, True

    def write(self, rank: int, rows: list[tuple[int, list[float]]]) -> None:
        """One process's new scores, as one part (atomically: a killed writer leaves no part)."""
        if not rows:
            return
        with atomic_path(self.directory / f"part-{time.time_ns()}-rank{rank:03d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, index=np.array([i for i, _ in rows], dtype=np.int64),
                     scores=np.array([row for _, row in rows], dtype=np.float32))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _progress_key(cfg: RunConfig, adapter_dir: Path, split: str, token_lists: list[list[int]],
                  label_ids: torch.Tensor) -> str:
    """What saved scores were made from: the adapter's bytes, every prompt's tokens, the label ids, the
    batching and the numerics. Scores saved under another key are never mixed in."""
    digest = hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes())
    model = {k: v for k, v in cfg.model.__dict__.items() if k not in ("cache_dir", "gguf_fallback")}
    digest.update(json.dumps({"split": split, "labels": label_ids.tolist(), "batch_size": cfg.score.batch_size,
                              "model": model, "mixed_precision": cfg.train.mixed_precision},
                             sort_keys=True, default=str).encode())
    for tokens in token_lists:
        digest.update(np.asarray(tokens, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:16]


def _any_process(accelerator: Accelerator, flags: list[bool]) -> list[bool]:
    """Decisions made the same on every process (any one says yes)."""
    votes = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [v > 0 for v in accelerator.reduce(votes, "max").tolist()]


@torch.no_grad()
def score_resumable(accelerator: Accelerator, model, token_lists: list[list[int]], label_ids: torch.Tensor,
                    pad_id: int, batch_size: int, saved: SavedScores, save_every_s: float) -> np.ndarray:
    """score_prompts for score_split, skipping the batches ``saved`` holds and able to stop.

    After each round (one batch per process) the processes vote; on a preemption signal, or every
    save_every_s seconds, each saves its new scores; on a signal they then raise Preempted together.
    Returns (N, K) float32 in input order, every prompt scored exactly once across all runs.
    """
    model.eval()
    todo = [b for b in _batches(token_lists, batch_size) if not saved.mask[b].all()]
    with accelerator.split_between_processes(todo) as mine:
        mine = sorted(mine, key=lambda b: len(token_lists[b[0]]), reverse=True)  # longest first: OOM shows at once
    rounds = math.ceil(len(todo) / accelerator.num_processes)  # the largest share: every process votes each round
    new: list[tuple[int, list[float]]] = []
    unsaved: list[tuple[int, list[float]]] = []
    last_save = time.time()
    bar = tqdm(total=len(token_lists), initial=saved.count, desc="scoring", unit="prompt",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    device = accelerator.device
    for r in range(rounds):
        if r < len(mine):
            input_ids, attention_mask = left_pad([token_lists[i] for i in mine[r]], pad_id)  # (B, L), (B, L)
            logits = label_logits(model, input_ids.to(device), attention_mask.to(device),
                                  label_ids.to(device))  # (B, K)
            unsaved.extend(zip(mine[r], logits.float().cpu().tolist()))
            bar.update(len(mine[r]))
        preempted, save_due = _any_process(accelerator, [
            preemption.requested(), bool(save_every_s) and time.time() - last_save > save_every_s])
        if preempted or save_due:
            saved.write(accelerator.process_index, unsaved)
            new, unsaved = new + unsaved, []
            accelerator.wait_for_everyone()  # every share on disk before anyone stops
            last_save = time.time()
        if preempted and r < rounds - 1:
            bar.close()
            done = saved.count + int(accelerator.reduce(torch.tensor(len(new), device=device), "sum").item())
            raise preemption.Preempted(f"scoring stopped with {done} of {len(token_lists)} prompts scored, saved in "
                                       f"{saved.directory}{preemption.describe_wait()}")
    bar.close()
    new += unsaved
    gathered = gather_object(new) if accelerator.num_processes > 1 else new
    scores, filled = saved.scores.copy(), saved.mask.copy()
    for i, row in gathered:
        if filled[i]:
            raise RuntimeError(f"prompt {i} was scored twice (saved by an earlier run and scored again)")
        scores[i], filled[i] = row, True
    if not filled.all():
        raise RuntimeError(f"scoring lost {int((~filled).sum())} of {len(token_lists)} prompts while gathering shards")
    non_finite = int((~np.isfinite(scores)).any(axis=1).sum())
    if non_finite:
        raise RuntimeError(f"the model produced non-finite label scores (NaN or inf) for {non_finite} of "
                           f"{len(token_lists)} prompts; float16 activations overflow easily: use "
                           f"model.dtype=bfloat16 or float32 (and no fp16 mixed precision)")
    return scores
