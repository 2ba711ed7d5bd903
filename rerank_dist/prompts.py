"""Prompt templates, title cleaning and truncation, and the one tokenisation convention for prompts.

A prompt lists the user's recent history and K lettered candidates and ends *exactly* where the
answer label goes, so the label's token is the next token both in training and in scoring.

Templates:

* ``alpaca_short`` (LlamaRec)::

      ### Instruction:
      {instruction}

      ### Input:
      {input}

      ### Response:

* ``chat``: the tokenizer's own chat template with one user turn (instruction + input) and
  ``add_generation_prompt=True``, so the prompt ends at the start of the assistant's answer.

The instruction is LlamaRec's; the input keeps LlamaRec's "User history:" / "Candidate pool:"
wording and ``(1) title`` / ``(A) title`` markers, one item per line.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from rerank_dist.config import PromptConfig

INSTRUCTION = ("Given user history in chronological order, recommend an item from the candidate pool "
               "with its index letter.")
ALPACA_SHORT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEMPLATES = ("alpaca_short", "chat")


class PromptError(ValueError):
    """A prompt cannot be built as configured; the message is one line naming the fix."""


# ---------------------------------------------------------------- tokenisation convention


@functools.lru_cache(maxsize=16)
def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own convention starts a sequence with BOS (Llama: yes; GPT-2/Qwen: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos and without[:1] != [bos]


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt (or prompt + label): the *only* way prompts are tokenised.

    BOS is prepended when the tokenizer's own convention adds one (Llama-style models were trained
    with it) and the text does not already begin with it (chat templates often write it, and a
    doubled BOS is a silent distribution shift). Nothing else is added: a post-processor that
    appends EOS would put EOS where the answer label must go.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _with_bos(tokenizer, text, ids)


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """``encode_prompt`` for many texts in one batched tokenizer call."""
    if not texts:
        return []
    batch = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [_with_bos(tokenizer, t, ids) for t, ids in zip(texts, batch)]


def _with_bos(tokenizer: Any, text: str, ids: list[int]) -> list[int]:
    if _adds_bos(tokenizer) and not text.startswith(tokenizer.bos_token):
        return [tokenizer.bos_token_id, *ids]
    return list(ids)


# ---------------------------------------------------------------- titles

_LINE_BREAKS = re.compile(r"[\r\n\t\v\f\x85\u2028\u2029]+")
_LABEL_MARKER = re.compile(r"\(\s*([A-Za-z])\s*\)")  # "(A)", "( b )": looks like a candidate label
_SECTION_MARKER = re.compile(r"#{3,}")  # "### Response:" would open a new prompt section
_SPACES = re.compile(r" {2,}")


def sanitize_title(title: str, special_tokens: Sequence[str] = ()) -> tuple[str, list[str]]:
    """Make a title inert inside a prompt; return it and the kinds of fix-up applied.

    A title must not be able to forge a candidate label or a prompt section, or the model learns
    (and is scored on) text the data author never meant as structure:

    * ``special_token``: the tokenizer's special-token strings (``<|im_end|>``, ``</s>``) -> space
    * ``newline``: newlines, tabs and other line breaks -> space (one item per line)
    * ``label_marker``: a parenthesised single letter ``(A)`` -> ``[A]``
    * ``section_marker``: ``###`` (or longer) -> ``#``

    Runs of spaces are collapsed and the ends stripped; that alone is not counted as a fix-up.
    """
    fixes: list[str] = []
    text = str(title)
    hits = [s for s in special_tokens if s and s in text]
    for s in hits:
        text = text.replace(s, " ")
    if hits:
        fixes.append("special_token")
    for kind, pattern, repl in (("newline", _LINE_BREAKS, " "), ("label_marker", _LABEL_MARKER, r"[\1]"),
                                ("section_marker", _SECTION_MARKER, "#")):
        text, n = pattern.subn(repl, text)
        if n:
            fixes.append(kind)
    return _SPACES.sub(" ", text).strip(), fixes


def truncate_title(title: str, tokenizer: Any, max_tokens: int) -> str:
    """The title cut to its first ``max_tokens`` tokens (as the tokenizer splits the bare title)."""
    ids = tokenizer(title, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return title
    # A cut inside a multi-byte character decodes to U+FFFD; drop that partial character.
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).rstrip("\ufffd").strip()


def special_token_strings(tokenizer: Any) -> list[str]:
    """Every special-token string the tokenizer would parse as a control token inside a title."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(tok.content)
    return sorted(found, key=len, reverse=True)  # longest first: "<|im_end|>" before "<|im"


class TitleBook:
    """Display titles by item id: sanitised, then cut to ``max_tokens``; each item prepared once.

    ``fixes`` counts *distinct items* per fix-up kind and ``truncated`` the items cut, so a stage can
    report how much of the catalogue needed cleaning.
    """

    def __init__(self, titles: Mapping[int, str], tokenizer: Any, max_tokens: int):
        self.titles = titles
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.special = special_token_strings(tokenizer)
        self.fixes: Counter[str] = Counter()
        self.truncated = 0
        self._cache: dict[int, str] = {}

    def __call__(self, item: int) -> str:
        item = int(item)
        if item not in self._cache:
            if item not in self.titles:
                raise PromptError(f"item {item} has no title in the dataset")
            clean, fixes = sanitize_title(self.titles[item], self.special)
            self.fixes.update(fixes)
            cut = truncate_title(clean, self.tokenizer, self.max_tokens)
            self.truncated += cut != clean
            self._cache[item] = cut
        return self._cache[item]


# ---------------------------------------------------------------- rendering


def format_input(history_titles: Sequence[str], candidate_titles: Sequence[str], labels: Sequence[str]) -> str:
    """The ``{input}`` block: numbered history (oldest first), then lettered candidates."""
    if len(candidate_titles) != len(labels):
        raise PromptError(f"{len(candidate_titles)} candidates but {len(labels)} labels")
    history = "\n".join(f"({i}) {t}" for i, t in enumerate(history_titles, start=1)) or "(none)"
    pool = "\n".join(f"({label}) {t}" for label, t in zip(labels, candidate_titles))
    return f"User history:\n{history}\n\nCandidate pool:\n{pool}"


def apply_template(template: str, input_text: str, tokenizer: Any = None) -> str:
    """The full prompt text, ending where the answer label goes."""
    if template == "alpaca_short":
        return ALPACA_SHORT.format(instruction=INSTRUCTION, input=input_text)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise PromptError("prompt.template=chat needs a tokenizer with a chat_template; use alpaca_short")
        messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{input_text}"}]
        # enable_thinking=False: Qwen3 then opens an empty think block so the answer comes at once;
        # templates without that variable ignore it.
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    raise PromptError(f"prompt.template: expected one of {list(TEMPLATES)}, got {template!r}")


@dataclass
class RenderedPrompt:
    text: str            # ends exactly where the answer label goes
    num_tokens: int      # len(encode_prompt(text))
    history_shown: int   # history titles in the prompt
    history_dropped: int  # oldest titles dropped to fit max_prompt_tokens


def render_prompt(tokenizer: Any, cfg: PromptConfig, labels: Sequence[str], history_titles: Sequence[str],
                  candidate_titles: Sequence[str]) -> RenderedPrompt:
    """Render with the last ``cfg.history_items`` titles; drop the oldest until it fits the budget.

    Titles must already be display titles (see ``TitleBook``).
    """
    shown = list(history_titles)[-cfg.history_items:] if cfg.history_items > 0 else []

    def attempt(drop: int) -> RenderedPrompt:
        text = apply_template(cfg.template, format_input(shown[drop:], candidate_titles, labels), tokenizer)
        return RenderedPrompt(text, len(encode_prompt(tokenizer, text)), len(shown) - drop, drop)

    first = attempt(0)
    if first.num_tokens <= cfg.max_prompt_tokens:
        return first
    bare = attempt(len(shown))
    if bare.num_tokens > cfg.max_prompt_tokens:
        raise PromptError(f"prompt is {bare.num_tokens} tokens even with no history, over "
                          f"prompt.max_prompt_tokens={cfg.max_prompt_tokens}; raise it or lower "
                          f"prompt.title_max_tokens (now {getattr(cfg, 'title_max_tokens', '?')})")
    # Fewer titles never make a longer prompt: binary-search the fewest to drop.
    lo, hi, best = 1, len(shown), bare
    while lo <= hi:
        mid = (lo + hi) // 2
        r = attempt(mid)
        if r.num_tokens <= cfg.max_prompt_tokens:
            best, hi = r, mid - 1
        else:
            lo = mid + 1
    return best


# ---------------------------------------------------------------- ids from pieces

_HISTORY_END = "\n\nCandidate pool:\n"
_POOL_END = "\n\n### Response:\n"


class PromptPieces:
    """Token ids of ``alpaca_short`` prompts put together from the ids of their pieces.

    A prompt is a fixed head, then ``(1)`` `` title\\n`` ... pieces, then the candidates' ``(A)``
    `` title\\n`` ... pieces, each tokenised once (a title once per line ending), so an example costs
    a few list joins instead of tokenising some 700 tokens again: what makes LlamaRec's million-example
    sets quick to build. Joined ids equal the whole text's ids only where the tokenizer never merges
    across those boundaries (byte-level BPE splits words from ``(``, ``)`` and line breaks before
    merging; SentencePiece-style tokenizers that mark word starts do not), so every piece is checked
    in context the first time it is used, and the whole layout once: a piece that fails is never
    joined (its prompts are tokenised whole), and a tokenizer whose layout fails gets no pieces at all
    (``build`` returns None). Not used for the chat template.
    """

    def __init__(self, tokenizer: Any, labels: Sequence[str], book: "TitleBook", history_items: int):
        self.tokenizer, self.book = tokenizer, book
        head_text = ALPACA_SHORT.split("{input}")[0].format(instruction=INSTRUCTION) + "User history:\n"
        self.head = _with_bos(tokenizer, head_text, self._ids(head_text))
        self.none = self._ids("(none)" + _HISTORY_END)
        self.numbers = {i: self._ids(f"({i})") for i in range(1, max(history_items, 0) + 1)}
        self.letters = [self._ids(f"({label})") for label in labels]
        self._titles: dict[tuple[int, str], list[int] | None] = {}
        self.whole = 0  # titles whose pieces failed the check: their prompts are tokenised whole

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @classmethod
    def build(cls, tokenizer: Any, cfg: PromptConfig, labels: Sequence[str], book: "TitleBook") -> "PromptPieces | None":
        if cfg.template != "alpaca_short":
            return None
        pieces = cls(tokenizer, labels, book, cfg.history_items)
        # The whole layout once, with every number and letter: the text as format_input writes it.
        probe_title = "Probe Title (2001)"
        history = [probe_title] * max(cfg.history_items, 0)
        text = apply_template("alpaca_short", format_input(history, [probe_title] * len(labels), labels))
        joined = pieces._join([probe_title] * len(history), [probe_title] * len(labels), raw=True)
        return pieces if joined == encode_prompts(tokenizer, [text])[0] else None

    def prepare(self, items: Sequence[int]) -> None:
        """Tokenise and check the pieces of these items' titles, in a few batched tokenizer calls."""
        keys = [(int(item), ending) for item in items for ending in ("\n", _HISTORY_END, _POOL_END)
                if (int(item), ending) not in self._titles]
        if not keys:
            return
        texts = [" " + self.book(item) + ending for item, ending in keys]
        before, after = self._ids("(7)"), self._ids("(B)")
        alone = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # Each piece between a label before it and one after it (none after the last candidate).
        context = self.tokenizer([f"(7){t}" + ("" if e == _POOL_END else "(B)") for t, (_, e) in zip(texts, keys)],
                                 add_special_tokens=False)["input_ids"]
        for key, ids, seen in zip(keys, alone, context):
            ok = seen == before + ids + ([] if key[1] == _POOL_END else after)
            self._titles[key] = ids if ok else None
            self.whole += not ok

    def _piece(self, item: int, ending: str) -> list[int] | None:
        key = (item, ending)
        if key not in self._titles:
            self.prepare([item])
        return self._titles[key]

    def _join(self, history: Sequence[Any], shown: Sequence[Any], raw: bool = False) -> list[int] | None:
        titles = self._titles
        if raw:  # the layout check: titles as text, nothing cached
            piece = lambda title, ending: self._ids(" " + title + ending)  # noqa: E731
        else:
            piece = lambda item, ending: titles[(item, ending)] if (item, ending) in titles else self._piece(item, ending)  # noqa: E731
        ids = list(self.head)
        if history:
            last = len(history)
            for i, item in enumerate(history, start=1):
                title = piece(item, _HISTORY_END if i == last else "\n")
                if title is None:
                    return None
                ids += self.numbers[i]
                ids += title
        else:
            ids += self.none
        last = len(shown) - 1
        for j, item in enumerate(shown):
            title = piece(item, _POOL_END if j == last else "\n")
            if title is None:
                return None
            ids += self.letters[j]
            ids += title
        return ids

    def encode(self, history: Sequence[int], shown: Sequence[int]) -> list[int] | None:
        """The prompt's ids for history items (oldest first, at most history_items) and shown candidates
        (item ids), as ``encode_prompts`` gives them for the rendered text; None when a piece failed its check."""
        return self._join(history, shown)
