"""Tiny real tokenizers built locally (no model hub), for fast tests.

Two styles matter for a letter verbalizer:

* ``build_bytelevel_bpe``: GPT-2 / SmolLM2 / Qwen style byte-level BPE. The GPT-2 split regex keeps
  ``"\\n"`` and the following letter apart, so the letter after ``"### Response:\\n"`` is the same token
  as the bare letter. Ships a ChatML-like chat template. Adds no BOS when encoding.
* ``build_sentencepiece_like``: Llama-2 style. A Metaspace pre-tokenizer puts ``"▁"`` before the first
  word only, and a post-processor prepends ``<s>``. ``tokenize("A")`` is ``"▁A"``, but the ``"A"`` that
  follows ``"\\n"`` inside a prompt is the plain ``"A"`` token: the trap that makes a verbalizer score
  a token the model never learned to produce.

Each builder trains on the in-code corpus below, saves to ``directory`` and returns the tokenizer
reloaded with ``AutoTokenizer`` (the way every stage loads one).
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

TITLES = [
    "Toy Story (1995)", "Jumanji (1995)", "Grumpier Old Men (1995)", "Heat (1995)",
    "Sabrina (1995)", "GoldenEye (1995)", "The American President (1995)", "Casino (1995)",
    "Sense and Sensibility (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
    "Powder (1995)", "Leaving Las Vegas (1995)", "Othello (1995)", "Now and Then (1995)",
    "The Usual Suspects (1995)", "Braveheart (1995)", "Taxi Driver (1976)", "Apollo 13 (1995)",
    "Batman Forever (1995)", "Star Wars: Episode IV - A New Hope (1977)", "Pulp Fiction (1994)",
    "The Shawshank Redemption (1994)", "Forrest Gump (1994)", "The Lion King (1994)",
    "Jurassic Park (1993)", "Schindler's List (1993)", "The Silence of the Lambs (1991)",
    "Fargo (1996)", "Independence Day (1996)", "Twelve Monkeys (1995)", "Blade Runner (1982)",
    "Alien (1979)", "Aliens (1986)", "Terminator 2: Judgment Day (1991)", "The Matrix (1999)",
    "Fight Club (1999)", "American Beauty (1999)", "The Sixth Sense (1999)", "Amelie (2001)",
    "Spirited Away (2001)", "Memento (2000)", "Gladiator (2000)", "Kill Bill: Vol. 1 (2003)",
    "Finding Nemo (2003)", "WALL-E (2008)", "Up (2009)", "Inception (2010)", "Zootopia (2016)",
    "Quiz Show (1994)", "Yojimbo (1961)", "Vertigo (1958)", "X-Men (2000)", "Ed Wood (1994)",
]

INSTRUCTION_TEXT = [
    "### Instruction:\nGiven user history in chronological order, recommend an item from the "
    "candidate pool with its index letter.\n\n### Input:\nUser history:\n(1) Toy Story (1995)\n\n"
    "Candidate pool:\n(A) Heat (1995)\n(B) Casino (1995)\n\n### Response:\nA",
    "<|im_start|>user\nRecommend an item.<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n",
]

LETTERS = string.ascii_uppercase + string.ascii_lowercase


def _corpus(drop_chars: str = "") -> list[str]:
    lines = list(TITLES) + INSTRUCTION_TEXT
    # Standalone letters and digits (word-initial forms like "▁A" / "ĠA"), and "(X) title" lines.
    lines += [" ".join(LETTERS), " ".join(string.digits), " ".join(f"({c})" for c in LETTERS)]
    lines += [f"({c}) {t}" for c, t in zip(LETTERS, TITLES)]
    lines += [f"Answer: {c}\n{c}" for c in LETTERS]
    if drop_chars:
        table = str.maketrans("", "", drop_chars)
        lines = [line.translate(table) for line in lines]
    return lines * 3


CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


def build_bytelevel_bpe(directory: str | Path, vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """GPT-2 / SmolLM2 / Qwen-like byte-level BPE with a ChatML chat template; no BOS is added."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    return _save_and_reload(fast, directory)


def build_sentencepiece_like(directory: str | Path, vocab_size: int = 400,
                             drop_chars: str = "") -> PreTrainedTokenizerFast:
    """Llama-2-like: Metaspace ("▁" before the first word only), "\\n" its own piece, ``<s>`` prepended.

    ``drop_chars`` leaves characters out of the vocabulary (they become ``<unk>``), to test label
    sets that a tokenizer cannot express.
    """
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(_corpus(drop_chars))) - set(drop_chars) - {" "}) + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(_corpus(drop_chars), trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    return _save_and_reload(fast, directory)


def _save_and_reload(fast: PreTrainedTokenizerFast, directory: str | Path) -> PreTrainedTokenizerFast:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
