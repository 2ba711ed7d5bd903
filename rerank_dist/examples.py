"""Training and evaluation examples: candidates, negatives, deterministic shuffling, prompts.

Conventions shared with the retriever stage: for a candidates row (user, prefix_len, target,
candidates, ...), the history is ``sequences[user][:prefix_len]`` and the target is
``sequences[user][prefix_len]``; ``candidates`` holds K items in retriever order, best first.

Training candidates (``PromptConfig.negatives``):

* ``retriever``: the retriever's K candidates, the hard negatives evaluation is judged on; when the
  target is missing it replaces the lowest-ranked candidate (the rate is reported).
* ``random``: the target + K-1 random items outside the history (LlamaRec's choice).
* ``mixed``: per example, ``round(mixed_random_fraction * (K-1))`` random negatives, the rest the
  retriever's best non-target candidates.

Validation/test candidates are exactly as retrieved; a missing target gives ``label_index=-1``
(scored as a miss).

Display order (``PromptConfig.train_order`` for training, ``eval_order`` for validation/test) is a
protocol choice, recorded with the metrics:

* ``shuffled``: a permutation seeded by (seed, user, prefix_len); in training the target's slot
  cycles through seeded permutations of the labels, so every letter is the answer equally often
  (counts differ by at most one) and a model cannot win by learning a position.
* ``retriever``: the retriever's order, best first (LlamaRec evaluates this way: a letter's
  position then carries the retriever's rank). A training target the retriever missed is shown at
  a slot allotted by quota from where the retriever places the targets it finds, counted over all
  training rows (before ``max_train_examples`` subsamples them) and add-one smoothed, so the answer
  positions a model sees in training follow the ones evaluation asks about; a few hundred rows
  drawn independently would teach a lumpy letter prior instead (a 192-row run showed 'S' 21 times
  and 'K', 'M', 'N', 'T' never, and its model answered 'S' for 60% of users).

Training rows (``PromptConfig.train_targets``): ``all`` keeps every row, inserting a target the
retriever missed as above; ``retrieved`` keeps only the rows whose target the retriever found,
the one situation evaluation can score (a user whose target is missing scores 0 under any order),
and counts the rows left out.

``permutation=p > 0`` shows the same candidates in another seeded order (permutation averaging).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rerank_dist.config import PromptConfig
from rerank_dist.prompts import PromptError, TitleBook, encode_prompts, render_prompt

# Salts keep the shuffling and sampling streams of one example independent.
_SHUFFLE, _SAMPLE, _SUBSET, _BALANCE, _SLOT = 1, 2, 3, 4, 5
_PERMUTATION = 100  # + p: the p-th extra display order of an evaluation prompt


class ExamplesError(PromptError):
    """Inputs that cannot make examples (one-line message); a PromptError, so the CLI reports it as bad input."""


@dataclass
class Example:
    user: int
    prefix_len: int
    split: str
    prompt: str                     # ends exactly where the answer label goes
    candidate_ids: list[int]        # item ids in displayed order (label i <-> candidate_ids[i])
    label_index: int                # index of the target in candidate_ids; -1 if absent (eval only)
    retriever_positions: list[int]  # 0-based retriever rank of each displayed candidate; -1 if not retrieved
    target: int
    retriever_scores: list[float]   # the retriever's score of each displayed candidate; NaN if not retrieved


def _rng(seed: int, user: int, prefix_len: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(user), int(prefix_len), salt])


def _sample_random(rng: np.random.Generator, num_items: int, exclude: set[int], n: int, user: int) -> list[int]:
    """n distinct items from 1..num_items, none in ``exclude``."""
    free = num_items - sum(1 for i in exclude if 1 <= i <= num_items)
    if free < n:
        raise ExamplesError(f"user {user}: only {free} items outside the history for {n} random negatives")
    out: list[int] = []
    seen = set(exclude)
    while len(out) < n:
        for x in rng.integers(1, num_items + 1, size=2 * (n - len(out)) + 8).tolist():
            if x not in seen:
                seen.add(x)
                out.append(x)
                if len(out) == n:
                    break
    return out


def _train_candidates(retrieved: list[int], target: int, history: Sequence[int], cfg: PromptConfig, num_items: int,
                      rng: np.random.Generator, user: int) -> list[int]:
    """Candidates for one training example, in retriever order where they come from the retriever."""
    k = len(retrieved)
    missing = target not in retrieved
    if cfg.negatives == "retriever":
        return retrieved[:-1] + [target] if missing else list(retrieved)
    exclude = set(history) | {target}
    if cfg.negatives == "random":
        return [target] + _sample_random(rng, num_items, exclude, k - 1, user)
    if cfg.negatives == "mixed":
        n_random = int(round(cfg.mixed_random_fraction * (k - 1)))
        hard = set([c for c in retrieved if c != target][: k - 1 - n_random])
        # Keep the target where the retriever put it (so unshuffled order stays retriever order).
        kept = [c for c in retrieved if c == target or c in hard]
        if missing:
            kept.append(target)
        return kept + _sample_random(rng, num_items, exclude | hard, n_random, user)
    raise ExamplesError(f"prompt.negatives: expected retriever | random | mixed, got {cfg.negatives!r}")


def _rows(candidates: Any, split: str, cfg: PromptConfig) -> list[tuple[int, int, int, list[int], list[float]]]:
    k = len(candidates["candidates"].iloc[0]) if len(candidates) else 0
    scores = (candidates["retriever_scores"] if "retriever_scores" in candidates
              else [[float("nan")] * k] * len(candidates))
    rows = [(int(u), int(p), int(t), [int(c) for c in cands], [float(x) for x in sc]) for (u, p, t, cands), sc in
            zip(candidates[["user", "prefix_len", "target", "candidates"]].itertuples(index=False, name=None), scores)]
    return rows


def _subsample(rows: list, split: str, cfg: PromptConfig) -> list:
    """At most ``max_train_examples`` training rows, a seeded subset in the original order."""
    cap = cfg.max_train_examples
    if split == "train" and 0 < cap < len(rows):
        keep = np.sort(np.random.default_rng([int(cfg.seed), _SUBSET]).choice(len(rows), size=cap, replace=False))
        rows = [rows[i] for i in keep]
    return rows


def found_slot_prior(rows: list, k: int) -> np.ndarray:
    """(k,) probability of each retriever slot holding the target, given the retriever found it.

    Counted over ``rows`` (user, prefix_len, target, retrieved, scores) and add-one smoothed, so a
    slot no row happens to show still gets some answers.
    """
    counts = np.ones(k)
    for _, _, target, retrieved, _ in rows:
        if target in retrieved[:k]:
            counts[retrieved.index(target)] += 1
    return counts / counts.sum()


def quota_slots(prior: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """n slots whose counts follow ``prior`` as closely as integers allow, in seeded order.

    Largest-remainder rounding: slot s gets floor(n*p_s) or one more, so even 150 missed targets
    reproduce the prior's shape instead of an independent draw's noise.
    """
    want = prior * n                                   # (k,)
    counts = np.floor(want).astype(int)
    short = n - int(counts.sum())
    counts[np.argsort(-(want - counts), kind="stable")[:short]] += 1
    return [int(s) for s in rng.permutation(np.repeat(np.arange(len(prior)), counts))]


def build_examples(candidates: Any, dataset: Any, cfg: PromptConfig, labels: Sequence[str], tokenizer: Any,
                   split: str, num_items: int, permutation: int = 0) -> tuple[list[Example], dict[str, Any]]:
    """Examples for one split and the stats that show whether they are fit to train/evaluate on.

    ``candidates``: DataFrame with user, prefix_len, target, candidates (K items, retriever order)
    and, where the retriever stage wrote them, retriever_scores (K floats, same order).
    ``permutation``: 0 = the configured order; p > 0 = the p-th seeded reordering (evaluation only).
    ``dataset``: has ``titles`` (item -> title) and ``sequences`` (user -> items, chronological).
    ``labels``: K labels, e.g. ``config.labels_for(run_cfg)``.
    """
    if split not in {"train", "val", "test"}:
        raise ExamplesError(f"split: expected train | val | test, got {split!r}")
    if permutation and split == "train":
        raise ExamplesError("permutation: extra display orders are for evaluation prompts, not training")
    labels = list(labels)
    order = cfg.train_order if split == "train" else cfg.eval_order
    book = TitleBook(dataset.titles, tokenizer, cfg.title_max_tokens)
    examples: list[Example] = []
    missing = truncated_prompts = dropped = placed = 0
    token_counts: list[int] = []
    all_rows = _rows(candidates, split, cfg)
    rows_without_target = 0
    if split == "train" and cfg.train_targets == "retrieved":
        kept = [row for row in all_rows if row[2] in row[3]]  # row: (user, prefix_len, target, retrieved, scores)
        rows_without_target = len(all_rows) - len(kept)
        if not kept:
            raise ExamplesError(f"prompt.train_targets=retrieved: the retriever found none of the {len(all_rows)} "
                                f"training targets; use train_targets=all")
        all_rows = kept
    rows = _subsample(all_rows, split, cfg)
    # Slots for the training targets the retriever missed, under retriever order: allotted from
    # where it puts the targets it finds (so training's answer positions match evaluation's).
    missed_slots: list[int] = []
    if split == "train" and order == "retriever" and cfg.negatives == "retriever" and not permutation:
        n_missed = sum(t not in r for _, _, t, r, _ in rows)
        missed_slots = quota_slots(found_slot_prior(all_rows, len(labels)), n_missed,
                                   np.random.default_rng([int(cfg.seed), _SLOT]))
    for user, prefix_len, target, retrieved, retrieved_scores in rows:
        if len(retrieved) != len(labels):
            raise ExamplesError(f"user {user} (prefix_len {prefix_len}): {len(retrieved)} candidates, "
                                f"expected {len(labels)} (one per label)")
        if len(set(retrieved)) != len(retrieved):
            raise ExamplesError(f"user {user} (prefix_len {prefix_len}): duplicate items among the candidates")
        history = _history(dataset, user, prefix_len, target)
        missing += target not in retrieved
        if split == "train":
            shown = _train_candidates(retrieved, target, history, cfg, num_items,
                                         _rng(cfg.seed, user, prefix_len, _SAMPLE), user)
        else:
            shown = list(retrieved)
        if permutation:
            shown = _shuffle(shown, target, None, _rng(cfg.seed, user, prefix_len, _PERMUTATION + permutation))
        elif order == "shuffled":
            slot = _balanced_slot(cfg.seed, placed, len(shown)) if target in shown else None
            shown = _shuffle(shown, target, slot, _rng(cfg.seed, user, prefix_len, _SHUFFLE))
            placed += target in shown
        elif missed_slots and target not in retrieved:
            shown.remove(target)
            shown.insert(missed_slots.pop(), target)
        rank = {item: i for i, item in enumerate(retrieved)}
        score_of = dict(zip(retrieved, retrieved_scores))
        rendered = render_prompt(tokenizer, cfg, labels, [book(i) for i in history], [book(i) for i in shown])
        truncated_prompts += rendered.history_dropped > 0
        dropped += rendered.history_dropped
        token_counts.append(rendered.num_tokens)
        examples.append(Example(user=user, prefix_len=prefix_len, split=split, prompt=rendered.text,
                                candidate_ids=shown,
                                label_index=shown.index(target) if target in shown else -1,
                                retriever_positions=[rank.get(i, -1) for i in shown], target=target,
                                retriever_scores=[score_of.get(i, float("nan")) for i in shown]))
    stats = _stats(examples, labels, split, order, cfg, missing, book)
    if split == "train":
        stats["train_targets"] = cfg.train_targets
        stats["rows_left_out_target_not_retrieved"] = rows_without_target
    stats.update(prompts_history_truncated=truncated_prompts, history_titles_dropped=dropped,
                 prompt_tokens_max=max(token_counts, default=0),
                 prompt_tokens_mean=round(float(np.mean(token_counts)), 1) if token_counts else 0.0)
    return examples, stats


def _balanced_slot(seed: int, j: int, k: int) -> int:
    """Display slot of the target for the j-th example that has one.

    Slots come from consecutive seeded permutations of range(k), so over any n examples every slot
    is the answer floor(n/k) or ceil(n/k) times: exact balance even for a few hundred examples, where
    an independent shuffle per example would leave some letters answered twice as often as others.
    """
    block = np.random.default_rng([int(seed), _BALANCE, j // k]).permutation(k)
    return int(block[j % k])


def _shuffle(shown: list[int], target: int, slot: int | None, rng: np.random.Generator) -> list[int]:
    """Seeded shuffle of the candidates; the target (if present) goes to ``slot``."""
    order = [shown[i] for i in rng.permutation(len(shown))]
    if slot is None:
        return order
    order.remove(target)
    order.insert(slot, target)
    return order


def _history(dataset: Any, user: int, prefix_len: int, target: int) -> list[int]:
    seq = dataset.sequences.get(user)
    if seq is None or not 0 <= prefix_len < len(seq):
        raise ExamplesError(f"user {user}: prefix_len {prefix_len} is outside a sequence of "
                            f"{0 if seq is None else len(seq)} items")
    if int(seq[prefix_len]) != target:
        raise ExamplesError(f"user {user}: target {target} is not sequences[user][{prefix_len}] "
                            f"({int(seq[prefix_len])}); candidates and dataset disagree")
    return [int(i) for i in seq[:prefix_len]]


def _stats(examples: list[Example], labels: list[str], split: str, order: str, cfg: PromptConfig, missing: int,
           book: TitleBook) -> dict[str, Any]:
    n = len(examples)
    counts = Counter(labels[e.label_index] for e in examples if e.label_index >= 0)
    per_label = {label: counts.get(label, 0) for label in labels}
    low, high = min(per_label.values(), default=0), max(per_label.values(), default=0)
    stats: dict[str, Any] = {
        "split": split,
        "examples": n,
        "labels": len(labels),
        "order": order,
        "shuffled": order == "shuffled",
        # Share of examples whose retriever candidates lacked the target (eval: guaranteed misses).
        "target_missing": missing,
        "target_missing_rate": round(missing / n, 4) if n else 0.0,
        "label_counts": per_label,
        # max/min answers per label; None when some label is never the answer.
        "label_balance_ratio": round(high / low, 3) if low else None,
        "title_fixes": dict(sorted(book.fixes.items())),
        "titles_truncated": book.truncated,
    }
    if split == "train":
        stats["negatives"] = cfg.negatives
        # retriever/mixed: the target replaced/joined retriever candidates this often; random: n/a.
        stats["target_insertion_rate"] = stats["target_missing_rate"] if cfg.negatives != "random" else None
    return stats


def tokenize_examples(examples: Sequence[Example], tokenizer: Any) -> list[list[int]]:
    """Prompt token ids per example, tokenised exactly as ``verbalizer.resolve_label_ids`` does.

    Uses ``prompts.encode_prompt``'s convention: BOS only where the tokenizer's own convention adds
    one and the text lacks it, no EOS. Training and scoring feed exactly these ids, with nothing
    appended, and read the K label tokens' logits at their last position (the answer position).
    Training's loss is the cross-entropy over those K logits, the correct label being the target: no
    label token is ever fed as input and no EOS is trained.
    """
    return encode_prompts(tokenizer, [e.prompt for e in examples])
