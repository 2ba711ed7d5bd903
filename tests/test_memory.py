"""The memory estimate behind --dry-run: exact parameter counts, NF4 storage, LoRA sizes, the
activation model, and finding config.json without the network."""

from __future__ import annotations

import gc
import json
import math
import socket
import time
from pathlib import Path

import pytest
import torch

from rerank_dist.config import ModelConfig
import rerank_dist.memory as memory
from rerank_dist.memory import (
    BACKEND_NAMES,
    BACKENDS,
    DS_REDUCE_BUCKET,
    GIB,
    OVERHEAD_BYTES,
    ZERO3_PREFETCH_BUCKET,
    _activation_bytes_per_token,
    _layout,
    estimate_training_memory,
    find_architecture,
    nf4_bytes,
    shipped_model_name,
)

REPO = Path(__file__).resolve().parent.parent
QWEN = json.loads((REPO / "configs/models/qwen3-4b/config.json").read_text())
LLAMA = json.loads((REPO / "configs/models/llama-2-7b/config.json").read_text())


def _cfg(**kw) -> ModelConfig:
    base = dict(name_or_path="x", dtype="bfloat16", quantization="nf4", lora_r=8,
                lora_target_modules=["q_proj", "v_proj"], lora_layers=0, gradient_checkpointing=False)
    base.update(kw)
    return ModelConfig(**base)


def _count_by_hand(arch: dict) -> int:
    """Parameters of a Llama / Qwen3 decoder from config.json arithmetic alone (no model built)."""
    h, i, v, n = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"], arch["num_hidden_layers"]
    d = arch.get("head_dim") or h // arch["num_attention_heads"]
    q, kv = arch["num_attention_heads"] * d, arch["num_key_value_heads"] * d
    attn = h * q + 2 * h * kv + q * h  # q, k, v, o projections, no biases
    mlp = 3 * h * i  # gate, up, down
    norms = 2 * h + (2 * d if arch["model_type"] == "qwen3" else 0)  # + Qwen3's per-head q/k norms
    head = 0 if arch.get("tie_word_embeddings") else v * h
    return v * h + n * (attn + mlp + norms) + h + head  # embedding, blocks, final norm, head


# ---------------------------------------------------------------- parameter counts


def test_llama_2_7b_has_exactly_its_published_parameter_count():
    est = estimate_training_memory(LLAMA, _cfg(), 1, 16)
    assert est["total_params"] == 6_738_415_616 == _count_by_hand(LLAMA)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_4b_parameter_count_follows_tie_word_embeddings(tied):
    arch = dict(QWEN, tie_word_embeddings=tied)
    est = estimate_training_memory(arch, _cfg(), 1, 16)
    assert est["total_params"] == _count_by_hand(arch)
    if tied:  # the shipped config: "4.0B" on the model card, 4,022,468,096 exactly
        assert est["total_params"] == 4_022_468_096
    else:  # an untied head adds vocab x hidden
        assert est["total_params"] == 4_022_468_096 + 151_936 * 2_560


@pytest.mark.parametrize("lora_layers", [0, 1])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_meta_count_equals_the_model_training_builds(arch, lora_layers, tmp_path):
    """The meta-device count equals a model really built on CPU, and the LoRA count equals the trainable
    parameters of the PeftModel that training builds (modeling.load_model), model.lora_layers included."""
    from transformers import AutoModelForCausalLM

    from rerank_dist.modeling import load_model
    from tests.tiny_models import tiny_config

    config = tiny_config(arch, vocab_size=300)
    assert config.num_hidden_layers == 2  # so lora_layers=1 adapts half the blocks
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    cfg = _cfg(name_or_path=str(tmp_path), quantization="none", dtype="float32", lora_r=4,
               lora_target_modules=targets, lora_layers=lora_layers, gguf_fallback=False)
    model = load_model(cfg, training=True)
    real_total = sum(p.numel() for p in model.base_model.model.parameters() if p.requires_grad is False)
    real_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == ({"1"} if lora_layers == 1 else {"0", "1"})  # the case this test is about

    est = estimate_training_memory(config.to_dict(), cfg, 1, 8)
    assert est["total_params"] == real_total
    assert est["trainable_params"] == real_trainable


def test_meta_build_of_7b_takes_seconds():
    _layout.cache_clear()
    t0 = time.perf_counter()
    estimate_training_memory(LLAMA, _cfg(), 1, 16)
    assert time.perf_counter() - t0 < 20  # about 1-2 s here; the bound only catches real allocation


# ---------------------------------------------------------------- weights


def test_nf4_bytes_match_bitsandbytes_storage():
    """The NF4 + double-quant formula against what bitsandbytes actually stores (runs on CPU)."""
    import bitsandbytes.functional as bnbf

    for shape in [(128, 320), (64, 64), (300, 70)]:
        w = torch.randn(shape, dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        stored = (packed.numel() * packed.element_size()
                  + state.absmax.numel() * state.absmax.element_size()  # uint8 absmax per block
                  + state.state2.absmax.numel() * 4  # fp32 absmax per 256 blocks
                  + state.code.numel() * 4 + state.state2.code.numel() * 4 + 4)  # code tables, offset
        assert nf4_bytes(w.numel()) == stored


def test_nf4_decoder_linears_are_a_quarter_to_a_third_of_bf16():
    for arch in (LLAMA, QWEN):
        d = estimate_training_memory(arch, _cfg(), 1, 16)["detail"]
        bf16 = d["quantized_params"] * 2
        assert bf16 / 4.5 < d["weights_4bit"] < bf16 / 3


def test_nf4_quantizes_every_block_linear_and_nothing_else():
    lay = _layout(json.dumps(LLAMA, sort_keys=True))
    quantized = {lin.name for lin in lay.linears if lin.quantized}
    assert "lm_head" not in quantized  # transformers keeps the output head unquantized
    assert len(quantized) == 32 * 7 and all(lin.layer is not None for lin in lay.linears if lin.quantized)


def test_unquantized_weights_are_float32_under_nf4_and_the_dtype_otherwise():
    """prepare_model_for_kbit_training upcasts embeddings, norms and the head to float32."""
    nf4 = estimate_training_memory(LLAMA, _cfg(), 1, 16)
    d = nf4["detail"]
    assert d["weights_unquantized"] == (nf4["total_params"] - d["quantized_params"]) * 4
    plain = estimate_training_memory(LLAMA, _cfg(quantization="none"), 1, 16)
    assert plain["weights"] == 6_738_415_616 * 2
    assert plain["detail"]["weights_4bit"] == 0


# ---------------------------------------------------------------- LoRA and optimizer


def test_lora_r8_on_q_v_of_llama_2_7b_is_the_well_known_4194304():
    est = estimate_training_memory(LLAMA, _cfg(lora_r=8, lora_target_modules=["q_proj", "v_proj"]), 1, 16)
    assert est["trainable_params"] == 4_194_304  # peft's "trainable params: 4,194,304"
    assert est["lora_adamw"] == 4_194_304 * 16  # fp32 weight + grad + two AdamW moments
    assert est["ddp_buckets"] == 0
    # model.lora_layers=10: adapters in the last 10 of the 32 blocks only
    last10 = estimate_training_memory(LLAMA, _cfg(lora_r=8, lora_target_modules=["q_proj", "v_proj"],
                                                  lora_layers=10), 1, 16)
    assert last10["trainable_params"] == 4_194_304 * 10 // 32


def test_more_processes_add_only_ddp_gradient_buckets():
    one = estimate_training_memory(LLAMA, _cfg(), 2, 64, world_size=1)
    eight = estimate_training_memory(LLAMA, _cfg(), 2, 64, world_size=8)
    assert eight["ddp_buckets"] == one["trainable_params"] * 4
    assert eight["total"] - one["total"] == eight["ddp_buckets"]


# ---------------------------------------------------------------- activations


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_grow_linearly_with_micro_batch(checkpointing):
    cfg = _cfg(gradient_checkpointing=checkpointing)
    acts = [estimate_training_memory(QWEN, cfg, mb, 512)["activations"] for mb in (1, 2, 3, 4)]
    steps = [b - a for a, b in zip(acts, acts[1:])]
    assert steps[0] > 0 and steps == pytest.approx([steps[0]] * 3, rel=1e-9)
    # ... and proportional but for one constant: bitsandbytes' 16-bit copy of the largest weight
    assert acts[0] - steps[0] == 2_560 * 9_728 * 2


def test_gradient_checkpointing_shrinks_activations():
    for arch, mb in ((LLAMA, 2), (QWEN, 4)):
        off = estimate_training_memory(arch, _cfg(gradient_checkpointing=False), mb, 1536)
        on = estimate_training_memory(arch, _cfg(gradient_checkpointing=True), mb, 1536)
        assert on["activations"] < off["activations"] / 4
        assert off["total"] - on["total"] == off["activations"] - on["activations"]


def test_autocast_shrinks_nf4_activations_and_no_logits_term_grows_with_vocab():
    no = estimate_training_memory(LLAMA, _cfg(), 2, 1536)
    bf16 = estimate_training_memory(LLAMA, _cfg(), 2, 1536, mixed_precision="bf16")
    assert bf16["activations"] < no["activations"]
    # Only the answer position reaches the head: 10x the vocabulary adds (B, 1, V) tensors, not (B, L, V).
    big_vocab = estimate_training_memory(dict(LLAMA, vocab_size=320_000), _cfg(), 2, 1536)
    assert big_vocab["activations"] - no["activations"] == 2 * (320_000 - 32_000) * 4 * 2


def test_summary_line_names_the_parts():
    cfg = _cfg(lora_r=16, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], gradient_checkpointing=True)
    est = estimate_training_memory(QWEN, cfg, 4, 1536, world_size=8)
    s = est["summary"]
    assert s.startswith("≈ ") and " GiB per device (" in s
    for part in ("weights", "nf4", "LoRA+AdamW", "activations", "micro-batch 4 x 1536 tokens",
                 "checkpointing on", "overhead"):
        assert part in s
    parts = ("weights", "lora_adamw", "ddp_buckets", "activations", "overhead")
    assert est["total"] == sum(est[p] for p in parts)
    assert all(isinstance(est[p], int) for p in (*parts, "total"))


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="model_type"):
        estimate_training_memory({"model_type": "no-such-arch", "hidden_size": 8}, _cfg(), 1, 8)


def _saved_bytes_per_block(model, input_ids, attention_mask) -> list[int]:
    """Bytes each decoder block saves for backward: new storages, counted whole, parameters left out.

    A storage is charged to the block that first saved it (the rotary tables and the padding mask
    are shared by all blocks, so block 0 pays for them).
    """
    from rerank_dist.label_scoring import label_logits

    blocks = model.base_model.model.model.layers
    current: list[int | None] = [None]
    per_block = [0] * len(blocks)
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights cost nothing extra
    hooks = []
    for idx, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(lambda _m, _a, i=idx: current.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda _m, _a, _o: current.__setitem__(0, None)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            per_block[current[0]] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            label_logits(model, input_ids, attention_mask, torch.tensor([5, 6]))
    finally:
        for h in hooks:
            h.remove()
    return per_block


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_activation_model_matches_saved_tensors_on_cpu(arch, tmp_path):
    """Per-token bytes per block from the formula against what autograd really keeps.

    bf16 weights, no quantization, dropout 0: the case where CPU and CUDA save the same tensors
    (CPU keeps dropout masks as floats, CUDA as bools). The slack covers per-row statistics
    (RMSNorm's rsqrt) that the formula leaves out.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from rerank_dist.modeling import load_model
    from tests.tiny_models import tiny_config

    dims = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                head_dim=64, num_hidden_layers=3)
    as_dict = {k: v for k, v in tiny_config(arch, vocab_size=300).to_dict().items() if k != "layer_types"}
    config = AutoConfig.for_model(**dict(as_dict, **dims))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    cfg = _cfg(name_or_path=str(tmp_path), quantization="none", lora_r=8, lora_dropout=0.0,
               lora_target_modules=targets, gguf_fallback=False)
    model = load_model(cfg, training=True)
    batch, length = 2, 96
    ids = torch.randint(3, 290, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :7] = 0  # left padding, as in training: SDPA gets an explicit mask
    measured = _saved_bytes_per_block(model, ids, mask)[1]  # block 1: its input requires grad

    per_tok = _activation_bytes_per_token(_layout(json.dumps(config.to_dict(), sort_keys=True)), cfg, "no")
    predicted = batch * length * sum(per_tok[k] for k in ("norms", "qk_norms", "attention", "mlp", "lora"))
    assert measured == pytest.approx(predicted, rel=0.03)


# ---------------------------------------------------------------- backends

# Small enough to build in no time, large enough that ZeRO-3 partitions some weights and keeps others
# whole: a packed NF4 weight of n values is n / 4 bf16 elements, persistent up to 1e5 elements.
TINY = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 512,
        "tie_word_embeddings": False}
PARTS = ("weights", "gathered_working_set", "lora_adamw", "ddp_buckets", "reduce_bucket", "activations", "overhead")


def _nf4(n: int) -> int:
    """NF4 + double quant by hand: codes n/2, uint8 absmax n/64, fp32 absmax per 256 blocks, tables."""
    return n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + (16 * 4 + 256 * 4 + 4)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("world", [1, 4])
def test_each_backend_adds_up_by_hand_on_a_tiny_model(world):
    """Every part but the activations, from the architecture and the backend's rules written out."""
    h, i, v, r = 512, 1024, 512, 8
    # (shape) of each quantized weight of one block: q, k, v, o, gate, up, down
    q_shapes = [(512, h), (256, h), (256, h), (h, 512), (i, h), (i, h), (h, i)]
    block_norms = [(h,), (h,)]
    embed, final_norm, head = (v, h), (h,), (v, h)
    lora = [(r, h), (512, r), (r, h), (256, r)]  # lora_A / lora_B of q_proj and v_proj
    P = 2 * sum(a * b for a, b in lora)  # 2 blocks
    assert P == 2 * (8 * (512 + 512) + 8 * (512 + 256))
    plain = 2 * sum(math.prod(s) for s in block_norms) + math.prod(embed) + math.prod(final_norm) + math.prod(head)
    quant = [a * b for a, b in q_shapes] * 2
    stats = sum(_nf4(n) - n // 2 for n in quant)
    cfg = _cfg()  # nf4, bf16, LoRA r=8 on q/v, no checkpointing
    est = {b: estimate_training_memory(TINY, cfg, 1, 32, world, mixed_precision="bf16", backend=b) for b in BACKENDS}
    for b, e in est.items():
        assert e["trainable_params"] == P and e["backend"] == b
        assert e["total"] == sum(e[k] for k in PARTS), b

    # DDP: the whole model, norms/embeddings/head fp32; LoRA fp32 weight + grad + 2 moments; buckets.
    ddp = est["ddp"]
    assert ddp["weights"] == sum(_nf4(n) for n in quant) + plain * 4
    assert ddp["lora_adamw"] == 16 * P and ddp["optimizer_shard"] == 8 * P
    assert ddp["ddp_buckets"] == (4 * P if world > 1 else 0)
    assert ddp["gathered_working_set"] == ddp["reduce_bucket"] == ddp["sharded_weights"] == 0

    # ZeRO-2 in DeepSpeed's bf16 mode: the whole model, cast to bf16 but the packed codes; LoRA bf16 whole,
    # its bf16 gradient, fp32 master and moments per partition; a bf16 bucket of 5e7 elements.
    z2, part = est["zero2"], _ceil(P, world)
    assert z2["weights"] == sum(_nf4(n) for n in quant) + plain * 2
    assert z2["lora_adamw"] == 2 * P + 2 * part + (4 + 8) * part
    assert z2["optimizer_shard"] == 12 * part
    assert z2["reduce_bucket"] == 50_000_000 * 2 and z2["ddp_buckets"] == 0

    # ZeRO-3: NF4 codes as bf16 elements (n / 4), partitioned; persistent (<= 1e5 elements) ones whole too.
    z3 = est["zero3"]
    elems = [(n // 4, 2) for n in quant] + [(math.prod(s), 2) for s in block_norms * 2 + [embed, final_norm, head]]
    shard = sum(_ceil(e, world) * b for e, b in elems)
    persistent = sum(e * b for e, b in elems if e <= 100_000)
    assert z3["sharded_weights"] == shard
    assert z3["weights"] == shard + persistent + stats
    lora_elems = [a * b for a, b in lora] * 2
    assert all(e <= 100_000 for e in lora_elems)  # every adapter stays whole on every process
    lparts = sum(_ceil(e, world) for e in lora_elems)
    assert z3["lora_adamw"] == 4 * lparts + 4 * P + 2 * lparts + 8 * lparts  # shard (= master), whole, bf16 grad, moments
    assert z3["optimizer_shard"] == 8 * lparts and z3["reduce_bucket"] == 50_000_000 * 2
    # A model this small is traversed in far fewer than stage3_max_reuse_distance elements, so nothing
    # is released: every non-persistent weight is whole (gate, up, down of both blocks, embedding, head).
    assert z3["gathered_working_set"] == sum(e * b for e, b in elems if e > 100_000)
    assert z3["detail"]["gathered_blocks"] == 2

    # FSDP2: dim-0 shards (the codes are an (n / 4, 1) bf16 tensor), the model dtype for the rest;
    # LoRA fp32 shards of weight, grad and moments; the tail (final norm, head) and 2 blocks gathered in bf16.
    fs = est["fsdp"]
    rows = [((n // 4, 1), 2) for n in quant] + [(s, 2) for s in block_norms * 2 + [embed, final_norm, head]]
    fshard = sum(_ceil(s[0], world) * math.prod(s[1:]) * b for s, b in rows)
    assert fs["sharded_weights"] == fshard and fs["weights"] == fshard + stats
    lshard = 2 * sum(_ceil(s[0], world) * s[1] for s in lora)
    assert fs["lora_adamw"] == 16 * lshard and fs["optimizer_shard"] == 8 * lshard
    block_whole = sum(a * b for a, b in q_shapes) // 2 + 2 * 2 * h + (P // 2) * 2  # codes, bf16 norms, bf16 LoRA
    assert fs["gathered_working_set"] == 2 * (h + v * h) + 2 * block_whole
    assert fs["reduce_bucket"] == fs["ddp_buckets"] == 0

    # Sharding: 1/W of the whole within one element per tensor; nothing sharded under ddp / zero2.
    whole16 = sum(e * b for e, b in elems)
    for e in (z3, fs):
        assert whole16 / world <= e["sharded_weights"] <= whole16 / world + 2 * len(elems) * (world - 1)
    if world == 1:
        assert z3["sharded_weights"] == fs["sharded_weights"] == whole16


def test_zero2_without_16_bit_mode_is_ddp_but_for_the_optimizer_partition_and_bucket():
    """DeepSpeed with bf16/fp16 off casts nothing: weights and activations as under DDP; the gradient
    reduce bucket is allocated at its full 5e7 fp32 elements however few trainable elements there are."""
    ddp = estimate_training_memory(LLAMA, _cfg(), 2, 256, 8, backend="ddp")
    z2 = estimate_training_memory(LLAMA, _cfg(), 2, 256, 8, backend="zero2")
    assert z2["weights"] == ddp["weights"] and z2["activations"] == ddp["activations"]
    P = ddp["trainable_params"]
    assert P < DS_REDUCE_BUCKET / 10
    assert z2["reduce_bucket"] == DS_REDUCE_BUCKET * 4
    assert z2["lora_adamw"] == 4 * P + 4 * math.ceil(P / 8) + 12 * math.ceil(P / 8)


def test_zero3_weights_on_8_processes_are_about_an_eighth_of_ddps_for_llama_2_7b():
    ddp = estimate_training_memory(LLAMA, _cfg(), 2, 1536, 8, mixed_precision="bf16", backend="ddp")
    lay = _layout(json.dumps(LLAMA, sort_keys=True))
    statistics = sum(nf4_bytes(p.numel) - p.numel // 2 for p in lay.params if p.quantized)
    for backend in ("zero3", "fsdp"):
        est = estimate_training_memory(LLAMA, _cfg(), 2, 1536, 8, mixed_precision="bf16", backend=backend)
        whole = est["detail"]["weights_whole_model"]  # NF4 codes + bf16 rest + statistics
        assert est["sharded_weights"] * 8 == pytest.approx(whole - statistics, rel=1e-4)
        # What is never sharded: the NF4 absmax statistics (~1/64 byte per weight), small persistent ones.
        assert ddp["weights"] / 8 < est["weights"] < ddp["weights"] / 8 * 1.1
        assert est["weights"] - est["sharded_weights"] < 0.12 * GIB


def test_sharded_backends_need_less_per_device_than_zero2_and_ddp_for_a_7b_model():
    totals = {b: estimate_training_memory(LLAMA, _cfg(), 2, 1536, 8, mixed_precision="bf16", backend=b)["total"]
              for b in BACKENDS}
    assert totals["fsdp"] < totals["zero2"] and totals["zero3"] < totals["zero2"] <= totals["ddp"]
    # ... and the gap between ddp and fsdp is more than the weights: fp32 embeddings also make DDP's
    # residual stream (and so its activations) fp32 under nf4.
    ddp, fsdp = (estimate_training_memory(LLAMA, _cfg(), 2, 1536, 8, mixed_precision="bf16", backend=b)
                 for b in ("ddp", "fsdp"))
    assert fsdp["activations"] < ddp["activations"]


def test_more_processes_shrink_only_the_sharded_parts():
    one, eight = (estimate_training_memory(QWEN, _cfg(gradient_checkpointing=True), 2, 512, w,
                                           mixed_precision="bf16", backend="fsdp") for w in (1, 8))
    assert one["activations"] == eight["activations"]
    assert one["gathered_working_set"] == eight["gathered_working_set"]
    assert eight["sharded_weights"] == pytest.approx(one["sharded_weights"] / 8, rel=1e-3)
    assert eight["optimizer_shard"] == pytest.approx(one["optimizer_shard"] / 8, rel=1e-3)


def test_zero3_reuse_distance_keeps_the_last_blocks_whole(monkeypatch):
    """stage3_max_reuse_distance (1e9 elements) keeps the blocks next to the forward/backward turn
    gathered; at 0 only the current block and the prefetch bucket's worth of the next are whole."""
    cfg = _cfg()  # Llama-2-7B, nf4, no checkpointing: forward + backward = 2 passes
    est = estimate_training_memory(LLAMA, cfg, 2, 256, 8, mixed_precision="bf16", backend="zero3")
    lay = _layout(json.dumps(LLAMA, sort_keys=True))
    block = sum(p.numel // 4 if p.quantized else p.numel for p in lay.params if p.layer == 0)
    block += 8 * (4096 + 4096) * 2  # LoRA on q and v, fp32 elements
    tail = 32_000 * 4_096 + 4_096  # head + final norm
    kept = sum(1 for j in range(32) if j * block * 2 + 2 * tail < 1e9)
    assert kept == 8
    assert est["detail"]["gathered_blocks"] == pytest.approx(kept + ZERO3_PREFETCH_BUCKET / block)
    monkeypatch.setattr(memory, "ZERO3_MAX_REUSE_DISTANCE", 0)
    tight = estimate_training_memory(LLAMA, cfg, 2, 256, 8, mixed_precision="bf16", backend="zero3")
    assert tight["detail"]["gathered_blocks"] == pytest.approx(1 + ZERO3_PREFETCH_BUCKET / block)
    # Each block held whole costs its NF4 codes (n / 2 bytes); norms and LoRA are persistent anyway.
    codes = sum(p.numel // 2 for p in lay.params if p.layer == 0 and p.quantized)
    assert est["gathered_working_set"] - tight["gathered_working_set"] == pytest.approx((kept - 1) * codes, abs=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_names_the_backend_and_its_parts_add_up(backend):
    est = estimate_training_memory(QWEN, _cfg(gradient_checkpointing=True), 4, 1536, 8, mixed_precision="bf16",
                                   backend=backend)
    s = est["summary"]
    assert s.startswith("≈ ") and f" GiB per device ({BACKEND_NAMES[backend]} on 8 processes: " in s
    assert f"{est['total'] / GIB:.1f} GiB" in s
    assert est["total"] == sum(est[p] for p in PARTS) and est["overhead"] == OVERHEAD_BYTES
    assert all(isinstance(est[p], int) for p in (*PARTS, "total", "sharded_weights", "optimizer_shard"))
    if backend in ("zero3", "fsdp"):
        assert "= 1/8 of" in s and "gathered" in s
    else:
        assert "gathered" not in s


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend"):
        estimate_training_memory(LLAMA, _cfg(), 1, 8, backend="zero1")


def test_estimate_follows_the_deepspeed_config_the_run_uses():
    """The bucket sizes and thresholds modelled here are the ones rerank_dist.distributed writes."""
    from rerank_dist.settings import load_config
    from rerank_dist.distributed import BACKEND_NAMES as RUN_NAMES
    from rerank_dist.distributed import deepspeed_config
    from rerank_dist.plan import plan_for

    cfg = load_config(str(REPO / "configs/llamarec_llama2_7b.yaml"), overrides=["train.backend=zero3"], world_size=8)
    zero = deepspeed_config(cfg, plan_for(cfg, 8))["zero_optimization"]
    assert zero["reduce_bucket_size"] == memory.DS_REDUCE_BUCKET
    assert zero["stage3_prefetch_bucket_size"] == memory.ZERO3_PREFETCH_BUCKET
    assert zero["stage3_param_persistence_threshold"] == memory.ZERO3_PERSISTENCE_THRESHOLD
    assert zero["stage3_max_live_parameters"] == memory.ZERO3_MAX_LIVE_PARAMETERS
    assert zero.get("stage3_max_reuse_distance", 1_000_000_000) == memory.ZERO3_MAX_REUSE_DISTANCE
    assert (zero["overlap_comm"], zero["contiguous_gradients"]) == (False, True)  # one bucket, allocated whole
    assert RUN_NAMES == BACKEND_NAMES


@pytest.mark.parametrize("configured", BACKENDS)
def test_dry_run_shows_a_memory_line_per_backend_marking_the_configured_one(configured):
    from rerank_dist.settings import load_config
    from rerank_dist.plan import dry_run_lines, plan_for

    cfg = load_config(str(REPO / "configs/qwen3_4b_qlora.yaml"), overrides=[f"train.backend={configured}"],
                      world_size=8)
    lines = dry_run_lines(cfg, plan_for(cfg, 8), cpu=True)
    world = next(line for line in lines if line.startswith("world: "))
    assert world.endswith(f"backend {BACKEND_NAMES[configured]} over gloo")
    memory_line = next(line for line in lines if line.startswith("memory: "))
    assert f"({BACKEND_NAMES[configured]} on 8 processes: " in memory_line
    table = [line for line in lines if line.startswith("  ") and line.split()[0] in BACKENDS]
    assert [line.split()[0] for line in table] == list(BACKENDS)
    assert [line for line in table if line.endswith("<- train.backend")] == [
        next(line for line in table if line.split()[0] == configured)]
    for backend, line in zip(BACKENDS, table):
        est = estimate_training_memory(QWEN, cfg.model, 2, cfg.prompt.max_prompt_tokens, 8,
                                       mixed_precision=cfg.train.mixed_precision, backend=backend)
        assert f"total {est['total'] / GIB:5.1f}" in line and f"weights {est['weights'] / GIB:5.1f}" in line
        # Only DDP's estimate was checked on a GPU; the others are labelled, not presented as facts.
        assert ("unmeasured" in line) is (backend != "ddp")
    assert ("unmeasured" in memory_line) is (configured != "ddp")


# ---------------------------------------------------------------- finding config.json


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE=1, and any socket use fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network touched: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # huggingface_hub's own HTTP layer too, so a call fails here even before it reaches a socket.
    import huggingface_hub.file_download as file_download
    import huggingface_hub.utils._http as hf_http

    for module in (hf_http, file_download):
        monkeypatch.setattr(module, "get_session", refuse, raising=False)


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """An empty Hugging Face cache and rerank_dist cache, so only the shipped configs can answer."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("RERANK_DIST_CACHE", str(tmp_path / "rd"))
    return tmp_path


def test_shipped_model_name():
    assert shipped_model_name("Qwen/Qwen3-4B") == "qwen3-4b"
    assert shipped_model_name("meta-llama/Llama-2-7b-hf") == "llama-2-7b"
    assert shipped_model_name("meta-llama/Llama-2-7b-chat-hf") == "llama-2-7b-chat"


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_hub_ids_resolve_to_the_shipped_configs_offline(no_network, empty_caches, monkeypatch, cwd):
    monkeypatch.chdir(REPO if cwd == "repo" else empty_caches)
    for name, shipped in [("Qwen/Qwen3-4B", "qwen3-4b"), ("meta-llama/Llama-2-7b-hf", "llama-2-7b")]:
        found = find_architecture(name)
        assert found is not None
        arch, source = found
        assert Path(source).resolve() == (REPO / "configs/models" / shipped / "config.json").resolve()
        assert arch == json.loads((REPO / "configs/models" / shipped / "config.json").read_text())


def test_unknown_id_is_none_without_network(no_network, empty_caches):
    assert find_architecture("nobody/Not-A-Model-7B") is None
    assert find_architecture("meta-llama/Llama-2-7b-chat-hf") is None  # a different name is not guessed
    assert find_architecture(str(empty_caches / "missing" / "dir")) is None


def test_configs_in_the_working_directory_are_found(no_network, empty_caches, monkeypatch):
    models = empty_caches / "configs" / "models" / "foo-1b"
    models.mkdir(parents=True)
    (models / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    monkeypatch.chdir(empty_caches)
    arch, source = find_architecture("org/Foo-1B-hf")
    assert arch["hidden_size"] == 8 and Path(source).parent.name == "foo-1b"


def test_local_directory_and_hf_cache_come_first(no_network, empty_caches):
    local = empty_caches / "my-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(dict(LLAMA, num_hidden_layers=2)))
    assert find_architecture(str(local)) == (dict(LLAMA, num_hidden_layers=2), str(local / "config.json"))
    (local / "config.json").unlink()
    assert find_architecture(str(local)) is None  # a local directory is taken as is

    # A config.json in the HF cache layout (refs/main -> snapshots/<sha>/) beats the shipped one.
    repo = empty_caches / "hf" / "models--Qwen--Qwen3-4B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(dict(QWEN, num_hidden_layers=3)))
    arch, source = find_architecture("Qwen/Qwen3-4B")
    assert arch["num_hidden_layers"] == 3 and "snapshots" in source


def test_gguf_conversion_in_the_rerank_dist_cache_is_found(no_network, empty_caches):
    converted = empty_caches / "rd" / "models" / "SmolLM2-135M-Instruct"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 576}))
    arch, source = find_architecture("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert arch["hidden_size"] == 576 and Path(source).parent == converted


# ---------------------------------------------------------------- against a real GPU


QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
GPU_CASES = {
    # name: (arch, layers kept, micro-batch, model overrides, mixed precision)
    "qwen3-4b-qlora-ckpt": (QWEN, 4, 4, dict(lora_r=16, lora_target_modules=QKVO, gradient_checkpointing=True), "no"),
    "qwen3-4b-qlora": (QWEN, 4, 4, dict(lora_r=16, lora_target_modules=QKVO), "no"),
    "llama-2-7b-qlora": (LLAMA, 4, 2, dict(), "no"),
    "llama-2-7b-qlora-ckpt": (LLAMA, 4, 2, dict(gradient_checkpointing=True), "no"),
    "llama-2-7b-qlora-autocast": (LLAMA, 4, 2, dict(), "bf16"),
    "llama-2-7b-bf16": (LLAMA, 4, 2, dict(quantization="none"), "no"),
}


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory):
    """Random-weight checkpoints with the real dimensions and vocabulary, fewer blocks; built once."""
    built: dict[tuple[str, int], Path] = {}

    def get(arch: dict, layers: int) -> Path:
        from transformers import AutoConfig, AutoModelForCausalLM

        key = (arch["model_type"], layers)
        if key not in built:
            config = AutoConfig.for_model(**dict(arch, num_hidden_layers=layers))
            with torch.device("cuda"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            built[key] = tmp_path_factory.mktemp(f"{key[0]}-{layers}")
            model.save_pretrained(built[key])
            del model
            torch.cuda.empty_cache()
        return built[key]

    return get


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_estimate_matches_the_measured_peak_on_gpu(case, random_checkpoints):
    """Peak allocated memory of two real training steps against the estimate without its overhead."""
    import torch.nn.functional as F

    from rerank_dist.label_scoring import label_logits
    from rerank_dist.modeling import load_model

    arch, layers, micro_batch, overrides, mixed = GPU_CASES[case]
    seq_len = 1536
    arch = dict(arch, num_hidden_layers=layers)
    cfg = _cfg(name_or_path=str(random_checkpoints(arch, layers)), gguf_fallback=False, **overrides)
    gc.collect()  # an earlier case's 4-bit weights sit in reference cycles; free them before counting
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = load_model(cfg, training=True, device="cuda:0")
    weights = torch.cuda.memory_allocated() - base
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 30_000, (micro_batch, seq_len), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :100] = 0  # left padding, as every training micro-batch has
    labels = torch.tensor([5, 6, 7, 8], device="cuda")
    peak = 0
    for _ in range(2):  # the second step holds the AdamW state the first one created
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed == "bf16"):
            logits = label_logits(model, ids, mask, labels)
        F.cross_entropy(logits, torch.zeros(micro_batch, dtype=torch.long, device="cuda")).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() - base
    est = estimate_training_memory(arch, cfg, micro_batch, seq_len, mixed_precision=mixed)
    predicted = est["total"] - est["overhead"]
    detail = {k: round(v / 2**30, 3) for k, v in est["detail"].items() if k != "quantized_params"}
    print(f"\n{case}: measured weights {weights / 2**30:.3f} GiB, estimate {est['weights'] / 2**30:.3f}; "
          f"measured peak {peak / 2**30:.3f} GiB, estimate {predicted / 2**30:.3f} "
          f"(ratio {predicted / peak:.3f}); detail GiB {json.dumps(detail)}")
    del model, optimizer, logits
    gc.collect()
    torch.cuda.empty_cache()
    assert weights == pytest.approx(est["weights"], rel=0.03)
    assert predicted == pytest.approx(peak, rel=0.15)


def test_nf4_weights_kept_out_of_fp32_count_two_bytes_each():
    """model.upcast_fp32=false: the embeddings and norms PEFT would upcast stay bf16, so their bytes halve."""
    upcast = estimate_training_memory(QWEN, _cfg(), 1, 64)
    kept = estimate_training_memory(QWEN, _cfg(upcast_fp32=False), 1, 64)
    plain_upcast, plain_kept = upcast["detail"]["weights_unquantized"], kept["detail"]["weights_unquantized"]
    assert plain_upcast > 0.7 * 1024**3  # the precondition: Qwen3-4B's 0.39e9 embedding, fp32
    assert plain_kept * 2 == plain_upcast
    assert kept["detail"]["weights_4bit"] == upcast["detail"]["weights_4bit"]
