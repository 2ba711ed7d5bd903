"""Label -> token id *in context*, and the checks that keep training and scoring on the same ids.

The id that matters is the token the model emits right after the prompt, not the id of the label
tokenised on its own: for a Llama-2 tokenizer ``tokenize("A")`` is ``"▁A"`` while the ``"A"`` after
``"### Response:\\n"`` is the plain ``"A"`` token. Scoring one and training the other ranks with
logits the model never learned (LlamaRec's verbalizer reads ``▁A`` while its loss targets ``A``).
Every id here comes from tokenising a real prompt with ``prompts.encode_prompt``.
"""

from __future__ import annotations

from typing import Any, Sequence

from rerank_dist.prompts import encode_prompt


class VerbalizerError(ValueError):
    """A label set that does not map to distinct single tokens after the prompt (one-line message)."""


def _tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return list(tokenizer.convert_ids_to_tokens(list(ids)))


def resolve_label_ids(tokenizer: Any, prompt: str, labels: Sequence[str]) -> list[int]:
    """The token id of each label as it follows ``prompt``: first token of prompt+label after the prompt's.

    Fails fast (VerbalizerError) when appending a label changes the prompt's own tokens, when a label
    is not exactly one token in context, when it is the unknown token, or when two labels share an id.
    """
    if not labels:
        raise VerbalizerError("no labels to resolve")
    base = encode_prompt(tokenizer, prompt)
    ids: list[int] = []
    for label in labels:
        full = encode_prompt(tokenizer, prompt + label)
        if full[: len(base)] != base:
            tail = _tokens(tokenizer, base[-2:])
            new_tail = _tokens(tokenizer, full[max(0, len(base) - 2):])
            raise VerbalizerError(
                f"label {label!r} merges with the end of the prompt ({tail} -> {new_tail}); "
                f"the prompt must end at a token boundary, e.g. with a newline")
        extra = full[len(base):]
        if len(extra) != 1:
            raise VerbalizerError(
                f"label {label!r} is {len(extra)} tokens after the prompt ({_tokens(tokenizer, extra)}), "
                f"expected exactly 1; choose a label set this tokenizer writes as single tokens")
        if tokenizer.unk_token_id is not None and extra[0] == tokenizer.unk_token_id and label != tokenizer.unk_token:
            raise VerbalizerError(f"label {label!r} is the unknown token {tokenizer.unk_token!r} for this tokenizer")
        ids.append(extra[0])
    _check_distinct(tokenizer, labels, ids)
    return ids


def _check_distinct(tokenizer: Any, labels: Sequence[str], ids: Sequence[int]) -> None:
    first: dict[int, str] = {}
    for label, i in zip(labels, ids):
        if i in first:
            raise VerbalizerError(f"labels {first[i]!r} and {label!r} are the same token "
                                  f"{_tokens(tokenizer, [i])[0]!r} (id {i}) after the prompt")
        first[i] = label


def verify_label_ids(tokenizer: Any, prompts: Sequence[str], labels: Sequence[str],
                     expected: Sequence[int] | None = None) -> list[int]:
    """Resolve the labels after each prompt; they must agree across prompts (and equal ``expected``).

    Run at training start with several real prompts: the ids used as training targets and the ids
    read at scoring must be one list, whatever the history and candidates before the answer.
    """
    if not prompts:
        raise VerbalizerError("verify_label_ids needs at least one prompt")
    ids = resolve_label_ids(tokenizer, prompts[0], labels)
    for n, prompt in enumerate(prompts[1:], start=1):
        other = resolve_label_ids(tokenizer, prompt, labels)
        for label, a, b in zip(labels, ids, other):
            if a != b:
                raise VerbalizerError(f"label {label!r} is id {a} after prompt 0 but id {b} after prompt {n}; "
                                      f"the token before the answer must not depend on the prompt's content")
    if expected is not None and [int(i) for i in expected] != ids:
        raise VerbalizerError(f"label ids in use {list(expected)} differ from the ids in context {ids}; "
                              f"training targets and scored ids must be the same list")
    return ids


def naive_mismatches(tokenizer: Any, labels: Sequence[str], ids: Sequence[int]) -> list[str]:
    """Labels whose standalone tokenisation differs from their in-context id, as readable lines.

    A diagnostic (no command calls it yet): shows where ``tokenizer.encode(label)`` would score the
    wrong token.
    """
    lines = []
    for label, i in zip(labels, ids):
        alone = tokenizer(label, add_special_tokens=False)["input_ids"]
        if alone != [i]:
            lines.append(f"{label!r}: in context {_tokens(tokenizer, [i])[0]!r} (id {i}), "
                         f"alone {_tokens(tokenizer, alone)} {alone}")
    return lines


def describe_label_ids(tokenizer: Any, labels: Sequence[str], ids: Sequence[int]) -> str:
    """One line: ``A='A'(36) B='B'(37) ...`` for logs."""
    return " ".join(f"{label}={tok!r}({i})" for label, i, tok in zip(labels, ids, _tokens(tokenizer, ids)))
