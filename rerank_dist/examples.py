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
from typing import Any, Iterator, Sequence

import numpy as np

from rerank_dist.config import PromptConfig
from rerank_dist.prompts import (PromptError, PromptPieces, TitleBook, apply_template, encode_prompts,
                                 format_input, render_prompt)

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
    input_ids: list[int] | None = None  # the prompt's token ids (prompts.encode_prompts), where built with them


def _rng(seed: int, user: int, prefix_len: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(user), int(prefix_len), salt])


def _sample_random(rng: np.random.Generator, num_items: int, history: "_History", extra: set[int], n: int,
                   user: int) -> list[int]:
    """n distinct items from 1..num_items, none in the history nor in ``extra``.

    Membership in the history is a lookup (``_History``), so the cost does not grow with its length.
    """
    outside = {i for i in extra if 1 <= i <= num_items and i not in history}
    free = num_items - history.distinct - len(outside)
    if free < n:
        raise ExamplesError(f"user {user}: only {free} items outside the history for {n} random negatives")
    out: list[int] = []
    seen = set(extra)
    while len(out) < n:
        for x in rng.integers(1, num_items + 1, size=2 * (n - len(out)) + 8).tolist():
            if x not in seen and x not in history:
                seen.add(x)
                out.append(x)
                if len(out) == n:
                    break
    return out


class _History:
    """``sequences[user][:prefix_len]`` as the examples use it: membership, distinct count, the last items.

    Built from per-user tables (the first position of each item, the count of distinct items before
    each position) made once per user, so an example costs the same whatever its history's length;
    LlamaRec's every-prefix set would otherwise copy each history again for each of its prefixes.
    """

    def __init__(self, seq: Sequence[int], first_position: dict[int, int], distinct_before: Sequence[int],
                 prefix_len: int):
        self.seq, self.first_position, self.prefix_len = seq, first_position, prefix_len
        self.distinct = int(distinct_before[prefix_len])

    def __contains__(self, item: int) -> bool:
        return self.first_position.get(item, self.prefix_len) < self.prefix_len

    def last(self, n: int) -> list[int]:
        return [int(i) for i in self.seq[max(0, self.prefix_len - n): self.prefix_len]] if n > 0 else []


class _Histories:
    """``_History`` of any (user, prefix_len); keeps the tables of the last user asked (rows come grouped by user)."""

    def __init__(self, sequences: Any):
        self.sequences = sequences
        self._user: int | None = None

    def of(self, user: int, prefix_len: int, target: int) -> _History:
        if user != self._user:
            seq = self.sequences.get(user)
            if seq is None:
                raise ExamplesError(f"user {user}: not in the dataset's sequences")
            self._seq = seq
            self._first: dict[int, int] = {}
            self._distinct = [0]
            for position, item in enumerate(seq):
                self._first.setdefault(int(item), position)
                self._distinct.append(len(self._first))
            self._user = user
        seq = self._seq
        if not 0 <= prefix_len < len(seq):
            raise ExamplesError(f"user {user}: prefix_len {prefix_len} is outside a sequence of {len(seq)} items")
        if int(seq[prefix_len]) != target:
            raise ExamplesError(f"user {user}: target {target} is not sequences[user][{prefix_len}] "
                                f"({int(seq[prefix_len])}); candidates and dataset disagree")
        return _History(seq, self._first, self._distinct, prefix_len)


def _train_candidates(retrieved: list[int], target: int, history: _History, cfg: PromptConfig, num_items: int,
                      k: int, rng: np.random.Generator, user: int) -> list[int]:
    """k candidates for one training example, in retriever order where they come from the retriever.

    ``retrieved`` may be empty when the negatives are all random (LlamaRec: 19 items drawn uniformly
    from outside the history and the target).
    """
    missing = target not in retrieved
    if not retrieved and cfg.negatives != "random":
        raise ExamplesError(f"prompt.negatives={cfg.negatives} takes negatives from the retriever's training "
                            f"candidates, and there are none (retriever.train_candidates=none); use negatives=random")
    if cfg.negatives == "retriever":
        return retrieved[:-1] + [target] if missing else list(retrieved)
    if cfg.negatives == "random":
        return [target] + _sample_random(rng, num_items, history, {target}, k - 1, user)
    if cfg.negatives == "mixed":
        n_random = int(round(cfg.mixed_random_fraction * (k - 1)))
        hard = set([c for c in retrieved if c != target][: k - 1 - n_random])
        # Keep the target where the retriever put it (so unshuffled order stays retriever order).
        kept = [c for c in retrieved if c == target or c in hard]
        if missing:
            kept.append(target)
        return kept + _sample_random(rng, num_items, history, {target} | hard, n_random, user)
    raise ExamplesError(f"prompt.negatives: expected retriever | random | mixed, got {cfg.negatives!r}")


@dataclass
class RowPlan:
    """Which examples a split has, in order, as arrays: what every example builder (one process or
    many, all rows or one part) starts from, so that any slice of it builds the same examples.

    The per-row display slot of the target is fixed here, from the whole split (shuffled order:
    consecutive seeded permutations of the labels; retriever order: the quota of missed targets),
    so an example depends on its row index alone, never on which rows were built before it.
    """

    users: np.ndarray        # (N,) int64
    prefix_lens: np.ndarray  # (N,) int64: history = sequences[user][:prefix_len]
    targets: np.ndarray      # (N,) int64: sequences[user][prefix_len]
    retrieved: np.ndarray    # (N, K) int64 retriever candidates, best first; (N, 0) when there are none
    scores: np.ndarray       # (N, K) float64 retriever scores; NaN where unknown
    slots: np.ndarray        # (N,) int64 display slot of the target; -1 = where the order puts it
    rows_left_out: int       # rows dropped by prompt.train_targets=retrieved

    def __len__(self) -> int:
        return len(self.users)


def candidate_arrays(candidates: Any) -> tuple[np.ndarray, ...]:
    """(users, prefix_lens, targets, retrieved (N, K), scores (N, K)) of a candidates DataFrame.

    Every row must have the same number of candidates (one per label); a row that differs is named.
    """
    n = len(candidates)
    users = candidates["user"].to_numpy(dtype=np.int64) if n else np.zeros(0, np.int64)
    prefix_lens = candidates["prefix_len"].to_numpy(dtype=np.int64) if n else np.zeros(0, np.int64)
    targets = candidates["target"].to_numpy(dtype=np.int64) if n else np.zeros(0, np.int64)
    lists = candidates["candidates"].tolist() if n else []
    k = len(lists[0]) if lists else 0
    for i, cands in enumerate(lists):
        if len(cands) != k:
            raise ExamplesError(f"user {users[i]} (prefix_len {prefix_lens[i]}): {len(cands)} candidates, "
                                f"expected {k} (as the first row has)")
    retrieved = np.asarray(lists, dtype=np.int64).reshape(n, k)
    if "retriever_scores" in candidates and n:
        scores = np.asarray(candidates["retriever_scores"].tolist(), dtype=np.float64).reshape(n, k)
    else:
        scores = np.full((n, k), np.nan)
    return users, prefix_lens, targets, retrieved, scores


def sequence_arrays(sequences: Any, prefixes_per_user: int) -> tuple[np.ndarray, ...]:
    """The training rows of ``sequences`` without retriever candidates: every user's latest
    ``prefixes_per_user`` training prefixes (0 = every prefix with a non-empty history), users
    ascending, latest prefix first, as the retriever stage orders its candidate rows
    (``data.splits.train_prefix_lens``). Built with array operations: ML-1M has a million rows."""
    users = np.array(sorted(sequences), dtype=np.int64)
    lengths = np.array([len(sequences[u]) for u in users], dtype=np.int64)
    latest = lengths - 3                                           # (U,) the latest training prefix_len
    count = np.clip(latest if prefixes_per_user <= 0 else np.minimum(latest, prefixes_per_user), 0, None)  # (U,)
    row_users = np.repeat(users, count)                            # (N,)
    within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)  # 0, 1, ... per user
    prefix_lens = np.repeat(latest, count) - within                # (N,) latest first, down to 1
    targets = np.fromiter((sequences[int(u)][int(p)] for u, p in zip(row_users, prefix_lens)), np.int64,
                          count=len(row_users))
    n = len(row_users)
    return row_users, prefix_lens, targets, np.zeros((n, 0), np.int64), np.zeros((n, 0))


def plan_rows(arrays: tuple[np.ndarray, ...], split: str, cfg: PromptConfig, k: int,
              permutation: int = 0) -> RowPlan:
    """The split's rows after prompt.train_targets and max_train_examples, with each target's slot."""
    users, prefix_lens, targets, retrieved, scores = arrays
    has_candidates = retrieved.shape[1] > 0
    found = (retrieved == targets[:, None]) if has_candidates else np.zeros((len(users), 0), bool)  # (N, K)
    left_out = 0
    if split == "train" and cfg.train_targets == "retrieved":
        keep = found.any(1) if has_candidates else np.zeros(len(users), bool)
        if not keep.any():
            raise ExamplesError(f"prompt.train_targets=retrieved: the retriever found none of the {len(users)} "
                                f"training targets; use train_targets=all")
        left_out = int((~keep).sum())
        users, prefix_lens, targets, retrieved, scores, found = (
            a[keep] for a in (users, prefix_lens, targets, retrieved, scores, found))
    # The prior of missed training targets' slots counts all training rows, before the subset.
    prior = found_slot_prior(targets, retrieved) if has_candidates and retrieved.shape[1] == k else np.ones(k) / k
    cap = cfg.max_train_examples
    if split == "train" and 0 < cap < len(users):
        keep_idx = np.sort(np.random.default_rng([int(cfg.seed), _SUBSET]).choice(len(users), size=cap, replace=False))
        users, prefix_lens, targets, retrieved, scores, found = (
            a[keep_idx] for a in (users, prefix_lens, targets, retrieved, scores, found))
    order = cfg.train_order if split == "train" else cfg.eval_order
    slots = np.full(len(users), -1, np.int64)
    # Training always shows the target; evaluation only when the retriever found it.
    shown = np.ones(len(users), bool) if split == "train" else found.any(1) if has_candidates else np.zeros(len(users), bool)
    if permutation:
        pass  # another seeded order of the same candidates: no slot is imposed
    elif order == "shuffled":
        j = np.cumsum(shown) - 1  # the j-th example that shows its target
        slots[shown] = balanced_slots(cfg.seed, j[shown], k)
    elif split == "train" and cfg.negatives == "retriever" and has_candidates:
        missed = ~found.any(1)
        quota = quota_slots(prior, int(missed.sum()), np.random.default_rng([int(cfg.seed), _SLOT]))
        slots[missed] = quota[::-1]  # the first missed row takes the last slot drawn, as a stack pops them
    return RowPlan(users, prefix_lens, targets, retrieved, scores, slots, left_out)


def found_slot_prior(targets: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
    """(k,) probability of each retriever slot holding the target, given the retriever found it.

    ``targets`` (N,), ``retrieved`` (N, k); add-one smoothed, so a slot no row happens to show still
    gets some answers.
    """
    counts = np.ones(retrieved.shape[1]) + (retrieved == np.asarray(targets)[:, None]).sum(0)  # (k,)
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


@dataclass
class _Draft:
    """An example before its prompt is rendered."""

    example: Example
    history: list[int]  # the last prompt.history_items items of the history, oldest first
    target_retrieved: bool  # True also where there are no retriever candidates to miss it


def _draft(plan: RowPlan, i: int, histories: _Histories, cfg: PromptConfig, k: int, split: str, num_items: int,
           order: str, permutation: int) -> _Draft:
    user, prefix_len, target = int(plan.users[i]), int(plan.prefix_lens[i]), int(plan.targets[i])
    retrieved = [int(c) for c in plan.retrieved[i]]
    retrieved_scores = [float(x) for x in plan.scores[i]]
    if retrieved and len(set(retrieved)) != len(retrieved):
        raise ExamplesError(f"user {user} (prefix_len {prefix_len}): duplicate items among the candidates")
    history = histories.of(user, prefix_len, target)
    if split == "train":
        shown = _train_candidates(retrieved, target, history, cfg, num_items, k,
                                  _rng(cfg.seed, user, prefix_len, _SAMPLE), user)
    else:
        shown = list(retrieved)
    slot = int(plan.slots[i])
    if permutation:
        shown = _shuffle(shown, target, None, _rng(cfg.seed, user, prefix_len, _PERMUTATION + permutation))
    elif order == "shuffled":
        shown = _shuffle(shown, target, slot if slot >= 0 else None, _rng(cfg.seed, user, prefix_len, _SHUFFLE))
    elif slot >= 0:  # a training target the retriever missed, at its allotted slot
        shown.remove(target)
        shown.insert(slot, target)
    rank = {item: r for r, item in enumerate(retrieved)}
    score_of = dict(zip(retrieved, retrieved_scores))
    example = Example(user=user, prefix_len=prefix_len, split=split, prompt="", candidate_ids=shown,
                      label_index=shown.index(target) if target in shown else -1,
                      retriever_positions=[rank.get(c, -1) for c in shown], target=target,
                      retriever_scores=[score_of.get(c, float("nan")) for c in shown])
    return _Draft(example, history.last(cfg.history_items), not retrieved or target in rank)


class ExampleStats:
    """What shows whether examples are fit to train or evaluate on, counted as they are made (so
    the counts of several parts add up: see ``merge``)."""

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.examples = self.missing = self.truncated_prompts = self.dropped = 0
        self.tokens_sum = self.tokens_max = 0
        self.label_counts = Counter({label: 0 for label in self.labels})

    def add(self, example: Example, num_tokens: int, history_dropped: int, target_retrieved: bool) -> None:
        self.examples += 1
        self.missing += not target_retrieved
        if example.label_index >= 0:
            self.label_counts[self.labels[example.label_index]] += 1
        self.truncated_prompts += history_dropped > 0
        self.dropped += history_dropped
        self.tokens_sum += num_tokens
        self.tokens_max = max(self.tokens_max, num_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "target_missing": self.missing, "label_counts": dict(self.label_counts),
                "prompts_history_truncated": self.truncated_prompts, "history_titles_dropped": self.dropped,
                "prompt_tokens_sum": self.tokens_sum, "prompt_tokens_max": self.tokens_max}

    @classmethod
    def merge(cls, labels: Sequence[str], parts: Sequence[dict[str, Any]]) -> "ExampleStats":
        total = cls(labels)
        for part in parts:
            total.examples += part["examples"]
            total.missing += part["target_missing"]
            total.label_counts.update(part["label_counts"])
            total.truncated_prompts += part["prompts_history_truncated"]
            total.dropped += part["history_titles_dropped"]
            total.tokens_sum += part["prompt_tokens_sum"]
            total.tokens_max = max(total.tokens_max, part["prompt_tokens_max"])
        return total

    def summary(self, split: str, order: str, cfg: PromptConfig, book_fixes: dict[str, int], titles_truncated: int,
                rows_left_out: int = 0) -> dict[str, Any]:
        """The stats as train_summary.json and the doctor read them."""
        n = self.examples
        per_label = {label: self.label_counts.get(label, 0) for label in self.labels}
        low, high = min(per_label.values(), default=0), max(per_label.values(), default=0)
        stats: dict[str, Any] = {
            "split": split,
            "examples": n,
            "labels": len(self.labels),
            "order": order,
            "shuffled": order == "shuffled",
            # Share of examples whose retriever candidates lacked the target (eval: guaranteed misses).
            "target_missing": self.missing,
            "target_missing_rate": round(self.missing / n, 4) if n else 0.0,
            "label_counts": per_label,
            # max/min answers per label; None when some label is never the answer.
            "label_balance_ratio": round(high / low, 3) if low else None,
            "title_fixes": dict(sorted(book_fixes.items())),
            "titles_truncated": titles_truncated,
        }
        if split == "train":
            stats["negatives"] = cfg.negatives
            # retriever/mixed: the target replaced/joined retriever candidates this often; random: n/a.
            stats["target_insertion_rate"] = stats["target_missing_rate"] if cfg.negatives != "random" else None
            stats["train_targets"] = cfg.train_targets
            stats["rows_left_out_target_not_retrieved"] = rows_left_out
        stats.update(prompts_history_truncated=self.truncated_prompts, history_titles_dropped=self.dropped,
                     prompt_tokens_max=self.tokens_max,
                     prompt_tokens_mean=round(self.tokens_sum / n, 1) if n else 0.0)
        return stats


def render_examples(plan: RowPlan, start: int, stop: int, dataset: Any, cfg: PromptConfig, labels: Sequence[str],
                    tokenizer: Any, book: TitleBook, split: str, num_items: int, stats: ExampleStats,
                    permutation: int = 0, batch_size: int = 256, with_text: bool = True,
                    pieces: PromptPieces | None | bool = True) -> Iterator[tuple[Example, list[int]]]:
    """(example, prompt token ids) for rows start..stop-1 of ``plan``, in order.

    The ids are exactly ``prompts.encode_prompts`` of the rendered text. They are joined from
    pre-tokenised pieces where the tokenizer allows (``prompts.PromptPieces``; the first row is also
    tokenised whole, and a mismatch turns the pieces off), else tokenised in batches; a prompt over
    ``max_prompt_tokens`` is rendered again with the oldest history titles dropped
    (``prompts.render_prompt``). ``with_text=False`` leaves ``Example.prompt`` empty where the ids
    came from pieces, but for the first row (a store of a million examples keeps ids, not text).
    ``pieces``: True = made here; a ``PromptPieces`` made for this book (reused across calls); None = none.
    """
    labels = list(labels)
    k = len(labels)
    order = cfg.train_order if split == "train" else cfg.eval_order
    if len(plan) and plan.retrieved.shape[1] not in (0, k):
        raise ExamplesError(f"user {plan.users[0]} (prefix_len {plan.prefix_lens[0]}): {plan.retrieved.shape[1]} "
                            f"candidates, expected {k} (one per label)")
    histories = _Histories(dataset.sequences)
    if pieces is True:
        pieces = PromptPieces.build(tokenizer, cfg, labels, book)

    def text_of(d: _Draft) -> str:
        return apply_template(cfg.template, format_input([book(h) for h in d.history],
                                                         [book(c) for c in d.example.candidate_ids], labels), tokenizer)

    for lo in range(start, stop, batch_size):
        drafts = [_draft(plan, i, histories, cfg, k, split, num_items, order, permutation)
                  for i in range(lo, min(lo + batch_size, stop))]
        ids_list = [pieces.encode(d.history, d.example.candidate_ids) if pieces else None for d in drafts]
        # The first row always gets its text: it is the check on the pieces, and a probe for the verbalizer.
        texts = [text_of(d) if with_text or ids is None or (lo == start and j == 0) else ""
                 for j, (d, ids) in enumerate(zip(drafts, ids_list))]
        if pieces is not None and lo == start and ids_list and ids_list[0] is not None:
            if ids_list[0] != encode_prompts(tokenizer, [texts[0]])[0]:
                pieces, ids_list = None, [None] * len(drafts)  # never trust pieces that disagree
                texts = [t or text_of(d) for t, d in zip(texts, drafts)]
        whole = [i for i, ids in enumerate(ids_list) if ids is None]
        for i, ids in zip(whole, encode_prompts(tokenizer, [texts[i] for i in whole])):
            ids_list[i] = ids
        for d, text, ids in zip(drafts, texts, ids_list):
            dropped = 0
            if len(ids) > cfg.max_prompt_tokens:
                rendered = render_prompt(tokenizer, cfg, labels, [book(h) for h in d.history],
                                         [book(c) for c in d.example.candidate_ids])
                text, dropped = rendered.text, rendered.history_dropped
                ids = encode_prompts(tokenizer, [text])[0]
            d.example.prompt = text
            stats.add(d.example, len(ids), dropped, d.target_retrieved)
            yield d.example, ids


def build_examples(candidates: Any, dataset: Any, cfg: PromptConfig, labels: Sequence[str], tokenizer: Any,
                   split: str, num_items: int, permutation: int = 0) -> tuple[list[Example], dict[str, Any]]:
    """Examples for one split, in memory, and the stats that show whether they are fit to train/evaluate on.

    ``candidates``: DataFrame with user, prefix_len, target, candidates (K items, retriever order)
    and, where the retriever stage wrote them, retriever_scores (K floats, same order).
    ``permutation``: 0 = the configured order; p > 0 = the p-th seeded reordering (evaluation only).
    ``dataset``: has ``titles`` (item -> title) and ``sequences`` (user -> items, chronological).
    ``labels``: K labels, e.g. ``config.labels_for(run_cfg)``.
    Training sets of LlamaRec's size go through ``example_store`` instead, built once on disk.
    """
    if split not in {"train", "val", "test"}:
        raise ExamplesError(f"split: expected train | val | test, got {split!r}")
    if permutation and split == "train":
        raise ExamplesError("permutation: extra display orders are for evaluation prompts, not training")
    labels = list(labels)
    plan = plan_rows(candidate_arrays(candidates), split, cfg, len(labels), permutation)
    book = TitleBook(dataset.titles, tokenizer, cfg.title_max_tokens)
    stats = ExampleStats(labels)
    examples = []
    for example, ids in render_examples(plan, 0, len(plan), dataset, cfg, labels, tokenizer, book, split, num_items,
                                        stats, permutation):
        example.input_ids = ids
        examples.append(example)
    order = cfg.train_order if split == "train" else cfg.eval_order
    return examples, stats.summary(split, order, cfg, book.fixes, book.truncated, plan.rows_left_out)


def balanced_slots(seed: int, j: np.ndarray, k: int) -> np.ndarray:
    """Display slot of the target for the j-th example that shows one, for each j in ``j``.

    Slots come from consecutive seeded permutations of range(k), so over any n examples every slot
    is the answer floor(n/k) or ceil(n/k) times: exact balance even for a few hundred examples, where
    an independent shuffle per example would leave some letters answered twice as often as others.
    """
    j = np.asarray(j, dtype=np.int64)
    if not len(j):
        return np.zeros(0, np.int64)
    blocks = np.arange(int(j.max()) // k + 1)
    table = np.stack([np.random.default_rng([int(seed), _BALANCE, int(b)]).permutation(k) for b in blocks])  # (B, k)
    return table[j // k, j % k]


def _shuffle(shown: list[int], target: int, slot: int | None, rng: np.random.Generator) -> list[int]:
    """Seeded shuffle of the candidates; the target (if present) goes to ``slot``."""
    order = [shown[i] for i in rng.permutation(len(shown))]
    if slot is None:
        return order
    order.remove(target)
    order.insert(slot, target)
    return order


def tokenize_examples(examples: Sequence[Example], tokenizer: Any) -> list[list[int]]:
    """Prompt token ids per example, tokenised exactly as ``verbalizer.resolve_label_ids`` does.

    Uses ``prompts.encode_prompt``'s convention: BOS only where the tokenizer's own convention adds
    one and the text lacks it, no EOS. Training and scoring feed exactly these ids, with nothing
    appended, and read the K label tokens' logits at their last position (the answer position).
    Training's loss is the cross-entropy over those K logits, the correct label being the target: no
    label token is ever fed as input and no EOS is trained. Examples made by ``build_examples``
    already carry these ids (``input_ids``) and are not tokenised again.
    """
    todo = [e.prompt for e in examples if e.input_ids is None]
    fresh = iter(encode_prompts(tokenizer, todo))
    return [list(e.input_ids) if e.input_ids is not None else next(fresh) for e in examples]
