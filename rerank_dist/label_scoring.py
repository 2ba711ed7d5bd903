"""Reading label scores off a causal LM: left padding, position ids, the answer-position logits.

Pure tensor code with no distributed concerns; the training loop and the scorer both call
``label_logits``, so the ids the loss trains are the ids the scorer reads.
"""

from __future__ import annotations

from typing import Any

import torch


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so the last position is the answer position in every row."""
    width = max(len(t) for t in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)  # (B, L)
    for row, tokens in enumerate(token_lists):
        input_ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, width - len(tokens):] = 1
    return input_ids, attention_mask


def left_pad_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token, as generate() numbers them.

    A plain forward numbers positions 0..L-1 whatever the mask, so a left-padded prompt would
    start at position L - len. Rotary attention only sees relative offsets, so that shift
    changes scores by rounding alone, but rotary variants that scale with the absolute position
    and absolute-position models would score a padded prompt differently from the same prompt alone.
    """
    positions = attention_mask.long().cumsum(-1) - 1  # (B, L)
    return positions.clamp(min=0)  # pad slots get 0; they are masked out anyway


def label_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 label_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits of the K label tokens at the answer position, as float32 (B, K).

    Inputs must be left padded, so the last column is every row's answer position. Only that
    position reaches the head (``logits_to_keep``): full (B, L, V) logits would cost L times the
    memory for values nobody reads. The model is called as a whole, so DDP / PEFT wrappers see
    the forward. Gradients flow when the caller allows them.

    The position is kept as an index tensor, not ``logits_to_keep=1``: the int slices the hidden
    states to a (B, 1, D) view that keeps the whole sequence's batch stride, which torch.matmul
    cannot fold into one mm; with frozen weights (LoRA, scoring) the head then runs as a batched
    matmul over a broadcast weight: on an AVX512-BF16 CPU in bfloat16, ~170 ms per row with
    SmolLM2's 49k vocabulary (~15% of a 600-token prompt's forward) against 15-20 ms for the whole
    batch as one mm (bench/results/README.md). Indexing copies the (B, D) rows into a
    dense tensor; scores and gradients are bit-identical to the int's.

    The K label rows are then projected again in float32 from the hidden state the head received:
    bf16 logits near 25 are spaced 0.125 apart, coarse enough to tie candidates.
    """
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("label_logits needs left-padded inputs: the last column of attention_mask has zeros")
    return _answer_logits(model, label_ids, input_ids=input_ids,  # (B, L)
                          attention_mask=attention_mask,  # (B, L)
                          position_ids=left_pad_position_ids(attention_mask),  # (B, L)
                          logits_to_keep=torch.tensor([input_ids.shape[1] - 1], device=input_ids.device))  # the last column


def pack(token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts end to end in one row, without padding: (input_ids (1, T), position_ids (1, T), answer
    positions (B,)), T the sum of the prompt lengths. Each prompt's positions start again at 0."""
    input_ids = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.long)[None]  # (1, T)
    position_ids = torch.cat([torch.arange(len(tokens)) for tokens in token_lists])[None]  # (1, T)
    ends = torch.tensor([len(tokens) for tokens in token_lists]).cumsum(0) - 1  # (B,) each prompt's last token
    return input_ids, position_ids, ends


def packed_label_logits(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, ends: torch.Tensor,
                        label_ids: torch.Tensor) -> torch.Tensor:
    """label_logits of prompts packed into one row (``pack``): float32 (B, K), one row per prompt.

    No attention mask is passed: transformers then reads the sequence boundaries off the restarting
    position_ids (masking_utils.find_packed_sequence_indices) and attends within each prompt only,
    with a block-diagonal mask under sdpa / eager and as variable-length sequences under
    flash_attention_2, the kernel where the padding-free row also saves attention work.
    """
    if input_ids.shape[0] != 1 or position_ids.shape != input_ids.shape:
        raise ValueError(f"packed_label_logits needs one packed row, got input_ids {tuple(input_ids.shape)} and "
                         f"position_ids {tuple(position_ids.shape)}")
    return _answer_logits(model, label_ids, input_ids=input_ids,  # (1, T)
                          position_ids=position_ids,  # (1, T)
                          logits_to_keep=ends.to(input_ids.device))  # (B,) the answer positions


def _answer_logits(model: Any, label_ids: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """Label logits (B, K) at the positions ``inputs['logits_to_keep']`` selects: the head sees (B, 1, D)
    for left-padded rows, (1, B, D) for a packed one; either way B answer positions."""
    head = _plain_output_head(model)
    seen: dict[str, torch.Tensor] = {}

    def take_hidden(module: torch.nn.Linear, args: tuple) -> None:
        # First of the head's pre-hooks: the hidden state as the model computed it. ZeRO-3's own
        # pre-hook then wraps the input to release the head's weight after the head's backward,
        # which never runs here (its full logits are not used), so the wrapped input must not be.
        seen["h"] = args[0].reshape(-1, args[0].shape[-1])  # (B, D) the answer positions

    def take_rows(module: torch.nn.Linear, args: tuple) -> None:
        # Last of the pre-hooks: under ZeRO-3 / FSDP the weight is whole only from the backend's
        # gather until its release after the forward.
        if module.weight.dim() != 2 or module.weight.shape[-1] != seen["h"].shape[-1]:
            return  # still a shard: the model's own logits are used instead
        ids = label_ids.to(module.weight.device)
        seen["w"] = module.weight.index_select(0, ids)  # (K, D)
        if module.bias is not None:
            seen["b"] = module.bias.index_select(0, ids)  # (K,)

    hooks = [head.register_forward_pre_hook(take_hidden, prepend=True),
             head.register_forward_pre_hook(take_rows)] if head is not None else []
    try:
        out = model(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    if "w" in seen:
        logits = seen["h"].float() @ seen["w"].float().T  # (B, D) @ (D, K) -> (B, K)
        return logits + seen["b"].float() if "b" in seen else logits
    full = out.logits.reshape(-1, out.logits.shape[-1])  # (B, V)
    return full.index_select(-1, label_ids.to(full.device)).float()  # (B, K)


def _plain_output_head(model: Any) -> torch.nn.Linear | None:
    """The model's lm head if logits are exactly hidden @ W.T (+ b); None where that is not known.

    A head with its own adapter or quantization, or a model that rescales / soft-caps its logits,
    is scored from the model's own logits instead.
    """
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine wrappers
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    config = getattr(inner, "config", None)
    rescaled = any(getattr(config, a, None) for a in ("final_logit_softcapping", "logit_scale"))
    return head if type(head) is torch.nn.Linear and not rescaled else None
