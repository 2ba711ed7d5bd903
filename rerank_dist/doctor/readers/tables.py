"""Foreign tables: a predictions / rankings file, and a training-examples file.

Columns are found by name (case-insensitive, common spellings) or given explicitly
(``--column role=name``). A predictions file needs the target and either scores per candidate or
a ranked list; the candidates in the order they were shown make the letter checks possible. A
training file is rows of prompt + answer (TRL prompt/completion, a ``text`` with the answer after
``### Response:``, or chat ``messages``), optionally with the candidate ids and the target.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rerank_dist.doctor.columns import ROLE_NAMES
from rerank_dist.doctor.evidence import Rankings, TrainingSide
from rerank_dist.doctor.readers.common import DoctorInputError, as_list, find_column, read_table, scalar
from rerank_dist.metrics import target_ranks

LETTERS = string.ascii_uppercase


def _columns(frame: pd.DataFrame, given: dict[str, str], roles: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for role in roles:
        if role in given:
            if given[role] not in frame.columns:
                raise DoctorInputError(f"--column {role}={given[role]}: no such column (columns: "
                                       f"{', '.join(map(str, frame.columns))})")
            out[role] = given[role]
        else:
            found = find_column(frame, ROLE_NAMES[role])
            if found is not None and found not in out.values():
                out[role] = found
    return out


def _target_position(target: Any, candidates: list) -> int:
    """Displayed position of the target: by item id, or a letter naming the position ("C" -> 2)."""
    if target in candidates:
        return candidates.index(target)
    if isinstance(target, str) and len(target.strip()) == 1 and target.strip().upper() in LETTERS:
        pos = LETTERS.index(target.strip().upper())
        return pos if pos < len(candidates) else -1
    return -1


def read_predictions(path: Path, given: dict[str, str] | None = None, retriever_order: str = "auto") -> Rankings:
    """Rankings from a predictions file. retriever_order: auto (a retriever_scores / retriever_rank column if
    there is one), given (the candidates column is in retriever order), none."""
    frame = read_table(path)
    cols = _columns(frame, given or {}, ("user", "candidates", "scores", "ranked", "target", "retriever_scores",
                                         "retriever_rank"))
    if "target" not in cols:
        raise DoctorInputError(f"{path}: no target column (looked for {', '.join(ROLE_NAMES['target'])}; "
                               f"name it with --column target=NAME)")
    if "scores" not in cols and "ranked" not in cols:
        raise DoctorInputError(f"{path}: neither scores per candidate nor a ranked list (looked for "
                               f"{', '.join(ROLE_NAMES['scores'] + ROLE_NAMES['ranked'])}; name one with --column)")
    n_rows = len(frame)
    num, tidx, rrank, top, ret_rank, items, targets = [], [], [], [], [], [], []
    shown_order = "candidates" in cols
    for row in range(n_rows):
        target = scalar(frame[cols["target"]].iloc[row])
        cands = as_list(frame[cols["candidates"]].iloc[row]) if shown_order else None
        ranked = as_list(frame[cols["ranked"]].iloc[row]) if "ranked" in cols else None
        scores = as_list(frame[cols["scores"]].iloc[row]) if "scores" in cols else None
        if cands is None:
            cands = list(ranked or [])
        if scores is not None and len(scores) != len(cands):
            raise DoctorInputError(f"{path}: row {row} has {len(scores)} scores for {len(cands)} candidates")
        pos = _target_position(target, cands)
        if scores is not None:
            s = np.asarray(scores, dtype=np.float64)[None, :]  # (1, N)
            rank = int(target_ranks(s, np.array([pos]))[0])
            first = int(np.argmax(s[0])) if len(cands) else -1
        else:
            in_ranked = target in ranked if ranked else False
            rank = ranked.index(target) if in_ranked else (-1 if pos < 0 else len(ranked))
            first = cands.index(ranked[0]) if shown_order and ranked and ranked[0] in cands else -1
        num.append(len(cands))
        tidx.append(pos)
        rrank.append(rank)
        top.append(first)
        ret_rank.append(_retriever_rank(frame, cols, row, pos, retriever_order))
        items.append(cands)
        targets.append(target)
    have_top = shown_order and all(t >= 0 for t in top)
    have_ret = all(r is not None for r in ret_rank) and n_rows > 0
    return Rankings(source=str(path), num_candidates=np.array(num, dtype=np.int64),
                    target_index=np.array(tidx, dtype=np.int64), reranker_rank=np.array(rrank, dtype=np.int64),
                    retriever_rank=np.array(ret_rank, dtype=np.int64) if have_ret else None,
                    top_position=np.array(top, dtype=np.int64) if have_top else None,
                    labels=list(LETTERS[: max(num)]) if num and max(num) <= len(LETTERS) else None,
                    candidate_items=items, targets=targets)


def _retriever_rank(frame: pd.DataFrame, cols: dict[str, str], row: int, pos: int, mode: str) -> int | None:
    if mode == "none":
        return None
    if mode == "given":
        return pos
    if "retriever_rank" in cols:
        return int(frame[cols["retriever_rank"]].iloc[row])
    if "retriever_scores" in cols:
        s = as_list(frame[cols["retriever_scores"]].iloc[row])
        if s is None:
            return None
        return int(target_ranks(np.asarray(s, dtype=np.float64)[None, :], np.array([pos]))[0])
    return None


# ---------------------------------------------------------------- training examples


# "(A) title" (LlamaRec) or "A. title" / "A) title" at the start of a line; and a pool's first option "(A)"
# right after a section name's colon, as LlamaRec itself writes it ("Candidate pool: (A) title \n (B) title
# ...") and chat prompts often do (only "(A)" there: a title such as "Alien: A. ..." must not start a pool).
_OPTION = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Z])[.)])\s+\S|:[ \t]*\((A)\)\s+\S", re.MULTILINE)
_RESPONSE = re.compile(r"(### Response:\s*\n|Answer:\s*)", re.IGNORECASE)


@dataclass
class TrainingFile:
    side: TrainingSide
    prompts: list[str] = field(default_factory=list)  # text up to where the answer goes
    labels: list[str] = field(default_factory=list)   # the option letters of the most common K


def _letters_in(prompt: str) -> list[str]:
    """The option letters of a prompt's candidate pool: the last run A, B, C, ... among the matches, so
    that a stray "Note: A. ..." elsewhere neither adds a candidate nor hides the pool."""
    found = [a or b or c for a, b, c in _OPTION.findall(prompt)]
    runs: list[list[str]] = []
    for letter in found:
        if runs and ord(letter.upper()) == ord(runs[-1][-1].upper()) + 1:
            runs[-1].append(letter)
        else:
            runs.append([letter])
    from_a = [run for run in runs if run[0].upper() == "A"]
    return from_a[-1] if from_a else found


def _prompt_and_answer(frame: pd.DataFrame, cols: dict[str, str], row: int) -> tuple[str | None, str | None]:
    if "messages" in cols:
        msgs = frame[cols["messages"]].iloc[row]
        msgs = list(msgs) if msgs is not None else []
        if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            prompt = "\n".join(str(m.get("content", "")) for m in msgs[:-1])
            return prompt, str(msgs[-1].get("content", ""))
    if "prompt" in cols and "completion" in cols:
        return str(frame[cols["prompt"]].iloc[row]), str(frame[cols["completion"]].iloc[row])
    if "text" in cols:
        text = str(frame[cols["text"]].iloc[row])
        parts = list(_RESPONSE.finditer(text))
        if parts:
            cut = parts[-1].end()
            return text[:cut], text[cut:]
    return None, None


def read_training_file(path: Path, given: dict[str, str] | None = None) -> TrainingFile:
    """What a ranker was trained on: candidates per example, answer letters, negatives."""
    frame = read_table(path)
    cols = _columns(frame, {k[len("train_"):]: v for k, v in (given or {}).items() if k.startswith("train_")},
                    # completion before target: "answer" / "label" name the answer letter in a training file
                    ("candidates", "prompt", "completion", "text", "messages", "negatives", "target"))
    k_counts: Counter = Counter()
    answers: Counter = Counter()
    negatives: list = []
    prompts: list[str] = []
    letter_sets: Counter = Counter()
    for row in range(len(frame)):
        prompt, answer = _prompt_and_answer(frame, cols, row)
        cands = as_list(frame[cols["candidates"]].iloc[row]) if "candidates" in cols else None
        target = scalar(frame[cols["target"]].iloc[row]) if "target" in cols else None
        letters = _letters_in(prompt) if prompt else []
        if prompt is not None:
            prompts.append(prompt)
            letter_sets[tuple(letters)] += 1
        if cands is not None:
            k_counts[len(cands)] += 1
            negatives.extend(c for c in cands if c != target)
        elif letters:
            k_counts[len(letters)] += 1
        letter = (answer or "").strip()[:1]
        if letter and letter.isalpha():
            answers[letter] += 1
        elif cands is not None and target in cands:
            answers[LETTERS[cands.index(target)] if cands.index(target) < 26 else str(cands.index(target))] += 1
    if not k_counts and not answers:
        raise DoctorInputError(f"{path}: found neither candidates nor prompt/answer columns (columns: "
                               f"{', '.join(map(str, frame.columns))}); name them with --column train_prompt=... "
                               f"--column train_completion=... or train_candidates / train_target")
    labels = list(letter_sets.most_common(1)[0][0]) if letter_sets else []
    if not labels and k_counts:
        labels = list(LETTERS[: k_counts.most_common(1)[0][0]])
    label_counts = None
    if answers:
        label_counts = {lab: answers.get(lab, 0) for lab in labels} if labels else dict(answers)
        for lab, n in answers.items():  # an answer outside the shown letters still counts
            label_counts.setdefault(lab, n)
    declared = None
    if "negatives" in cols:
        values = frame[cols["negatives"]].dropna().astype(str).str.lower().unique().tolist()
        declared = values[0] if len(values) == 1 else ("mixed" if values else None)
    side = TrainingSide(source=str(path), k_counts=k_counts or None, label_counts=label_counts,
                        negatives_declared=declared, negative_items=negatives or None)
    return TrainingFile(side=side, prompts=prompts, labels=labels)
