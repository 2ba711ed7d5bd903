"""Label ids in context, on both tokenizer styles, and the failures that must be loud."""

import pytest

from rerank_dist.config import LABEL_SETS, PromptConfig
from rerank_dist.prompts import apply_template, encode_prompt, format_input, render_prompt
from rerank_dist.verbalizer import (VerbalizerError, describe_label_ids, naive_mismatches, resolve_label_ids,
                                    verify_label_ids)
from tests.tiny_tokenizers import build_sentencepiece_like

LETTERS20 = LABEL_SETS["letters"][:20]


def prompt_for(tok, labels, history=("Toy Story (1995)", "Heat (1995)"), template="alpaca_short"):
    titles = [f"Candidate {i} (2000)" for i in range(len(labels))]
    return render_prompt(tok, PromptConfig(template=template), labels, list(history), titles).text


def test_bytelevel_letters_are_their_standalone_tokens(bpe):
    ids = resolve_label_ids(bpe, prompt_for(bpe, LETTERS20), LETTERS20)
    assert len(set(ids)) == 20
    assert ids == [bpe(label, add_special_tokens=False)["input_ids"][0] for label in LETTERS20]
    assert naive_mismatches(bpe, LETTERS20, ids) == []


def test_sentencepiece_like_resolves_the_token_that_follows_the_prompt(spm):
    prompt = prompt_for(spm, LETTERS20)
    ids = resolve_label_ids(spm, prompt, LETTERS20)
    # The id is the token that really comes after "### Response:\n" ...
    full = encode_prompt(spm, prompt + "A")
    assert ids[0] == full[-1] and spm.convert_ids_to_tokens(ids[0]) == "A"
    # ... not what the bare label tokenises to (the LlamaRec trap: "▁A").
    alone = spm("A", add_special_tokens=False)["input_ids"]
    assert spm.convert_ids_to_tokens(alone) == ["▁A"] and alone != [ids[0]]
    assert len(naive_mismatches(spm, LETTERS20, ids)) == 20
    assert "A='A'" in describe_label_ids(spm, LETTERS20, ids)


def test_chat_template_prompt(bpe):
    ids = resolve_label_ids(bpe, prompt_for(bpe, LETTERS20, template="chat"), LETTERS20)
    assert len(set(ids)) == 20


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_upper_and_lower_letters(which, request):
    tok = request.getfixturevalue(which)
    labels = LABEL_SETS["letters_lower"]
    assert len(set(resolve_label_ids(tok, prompt_for(tok, labels), labels))) == 52


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_multi_token_label_is_named(which, request):
    tok = request.getfixturevalue(which)
    labels = ["A", "B", "Zq7xJ"]
    with pytest.raises(VerbalizerError, match=r"label 'Zq7xJ' is \d+ tokens after the prompt"):
        resolve_label_ids(tok, prompt_for(tok, labels), labels)


def test_tokenizer_lacking_a_letter(tmp_path):
    tok = build_sentencepiece_like(tmp_path, drop_chars="Q")
    with pytest.raises(VerbalizerError, match="label 'Q' is the unknown token"):
        resolve_label_ids(tok, prompt_for(tok, LETTERS20), LETTERS20)


def test_label_merging_with_prompt_end(bpe):
    # A prompt ending in a space: " A" becomes one token, so the prompt's own last token changes.
    with pytest.raises(VerbalizerError, match="label 'A' merges with the end of the prompt"):
        resolve_label_ids(bpe, "Answer: ", ["A"])


def test_duplicate_labels(bpe):
    with pytest.raises(VerbalizerError, match="labels 'B' and 'B' are the same token"):
        resolve_label_ids(bpe, prompt_for(bpe, ["A", "B", "B"]), ["A", "B", "B"])


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_ids_agree_across_prompts(which, request):
    tok = request.getfixturevalue(which)
    prompts = [prompt_for(tok, LETTERS20, history=h) for h in [(), ("Heat (1995)",), ("Up (2009)", "Alien (1979)")]]
    ids = verify_label_ids(tok, prompts, LETTERS20)
    assert verify_label_ids(tok, prompts, LETTERS20, expected=ids) == ids
    with pytest.raises(VerbalizerError, match="must be the same list"):
        verify_label_ids(tok, prompts, LETTERS20, expected=ids[::-1])


def test_ids_that_depend_on_the_prompt_are_rejected(bpe):
    # Same labels, prompts that end differently: the second one merges "A" into " A".
    base = apply_template("alpaca_short", format_input([], ["x"], ["A"]))
    with pytest.raises(VerbalizerError):
        verify_label_ids(bpe, [base, base + " "], ["A"])
