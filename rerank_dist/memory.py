"""Memory per device for LoRA / QLoRA training, estimated from a model's config.json alone.

``--dry-run`` prints this before anything is downloaded or loaded, so it must work offline and
fast: ``find_architecture`` reads config.json from a local directory, the Hugging Face cache or
the architecture files shipped in ``configs/models/``; ``estimate_training_memory`` builds the
model on the meta device (no storage), counts parameters by module, and adds up bytes per part
for data-parallel (DDP) training, where every process holds the whole model.

What the numbers follow is this repository's own training path (``rerank_dist.modeling``):

* nf4: transformers replaces every plain ``nn.Linear`` except the output head with a bitsandbytes
  ``Linear4bit`` (NF4, blocksize 64, double quant), then ``peft.prepare_model_for_kbit_training``
  casts *every other* 16-bit parameter (embeddings, norms, the head) to float32. The fp32
  embedding makes the residual stream float32, and ``Linear4bit`` returns its input's dtype, so
  without autocast (``train.mixed_precision=no``, the default) activations are float32 too.
* LoRA weights are float32 and trained with torch AdamW: 4 weight + 4 grad + 8 moments bytes.
* Only the answer position reaches the LM head (``logits_to_keep=1``, see ``label_scoring``):
  there is no (B, L, V) logits tensor to count.

Checked against torch.cuda.max_memory_allocated() over two real training steps on an H200
(random weights with Qwen3-4B's and Llama-2-7B's real widths and vocabularies, 4 blocks,
1536 tokens; nf4 with and without checkpointing, with autocast, and plain bf16): the estimate
less its fixed overhead came within 5% (0.99-1.04x) in every case (tests/test_memory.py,
marked gpu).

accelerate has an estimator (``accelerate estimate-memory``, accelerate/commands/estimate.py) but
it does not fit here: ``create_empty_model`` asks the hub for model info first (network), and
``estimate_training_usage`` assumes full fine-tuning (Adam state for every parameter) and ignores
activations. Its building blocks are reused: ``init_empty_weights`` for the meta model, and
transformers' own ``get_keys_to_not_convert`` / ``should_convert_module`` to decide, as
``from_pretrained`` would, which Linear layers bitsandbytes quantizes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from rerank_dist.config import ModelConfig

log = logging.getLogger(__name__)

GIB = 1024**3
# CUDA context, cuBLAS workspace and caching-allocator slack, none of which torch's allocated-bytes
# count shows. An assumption: 0.5-1 GiB is typical; on an H200 with torch 2.11 / CUDA 13 the
# context plus cuBLAS workspace alone took 0.67 GiB. Fragmentation can add more on long runs.
OVERHEAD_BYTES = int(0.75 * GIB)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes NF4 (quantize_4bit with compress_statistics=True, as BitsAndBytesConfig
# bnb_4bit_use_double_quant=True asks): two 4-bit codes per uint8 byte; one absmax per 64 weights,
# itself quantized to uint8 (quantize_blockwise, blocksize 256) with one fp32 absmax per 256 blocks.
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
# Per quantized tensor: the 16-entry fp32 NF4 code, the 256-entry fp32 map of the nested quantizer
# and the fp32 offset (the map may be shared between tensors, so this is an upper bound).
_NF4_PER_TENSOR_BYTES = 16 * 4 + 256 * 4 + 4
# AdamW on the fp32 LoRA weights: weight 4 + gradient 4 + exp_avg 4 + exp_avg_sq 4 bytes.
ADAMW_BYTES_PER_TRAINABLE = 16
# DDP's reducer copies gradients into its own buckets (Accelerate does not ask for
# gradient_as_bucket_view): one more fp32 copy of the trainable gradients when world_size > 1.
DDP_BUCKET_BYTES_PER_TRAINABLE = 4


# ---------------------------------------------------------------- finding config.json offline


def shipped_model_name(name_or_path: str) -> str:
    """The configs/models/<name> a hub id maps to: last path part, lower case, "-hf" dropped."""
    last = name_or_path.rstrip("/").split("/")[-1].lower()
    return last[: -len("-hf")] if last.endswith("-hf") else last


def _shipped_dirs() -> list[Path]:
    # The working directory first (a checkout run from its root), then the repository root
    # holding this package (an editable install run from elsewhere).
    dirs = [Path.cwd() / "configs" / "models", Path(__file__).resolve().parent.parent / "configs" / "models"]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def _from_hf_cache(repo_id: str) -> Path | None:
    """config.json of repo_id if it is in the Hugging Face cache; a file-system look-up only."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id (a missing local path, say): nothing cached under it
        return None
    # A str is a file path; None means not cached; _CACHED_NO_EXIST means "known absent".
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def find_architecture(name_or_path: str, cache_dir: str = "") -> tuple[dict, str] | None:
    """The model's config.json as a dict and the file it came from, without network or weights.

    Looked for, in order: (a) a local directory's config.json (a local directory is used as is,
    as ``model_source`` does, so nothing else is tried for it); (b) the Hugging Face cache; (c) the
    GGUF conversion ``model_source`` keeps under the rerank_dist cache (``cache_dir``, else
    $RERANK_DIST_CACHE, else ~/.cache/rerank_dist); (d) ``configs/models/<name>/config.json``
    shipped with the repository, ``<name>`` from ``shipped_model_name``. None if none has it.
    """
    from rerank_dist.paths import cache_dir as rerank_cache_dir

    if not name_or_path.strip():
        return None
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        candidates = [local / "config.json"]
    else:
        cached = _from_hf_cache(name_or_path)
        candidates = [cached] if cached is not None else []
        last = name_or_path.rstrip("/").split("/")[-1]
        candidates.append(rerank_cache_dir(cache_dir) / "models" / last / "config.json")
        candidates += [d / shipped_model_name(name_or_path) / "config.json" for d in _shipped_dirs()]
    for path in candidates:
        if path.is_file():
            try:
                arch = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                log.warning("memory: cannot read %s (%s)", path, e)
                continue
            if isinstance(arch, dict) and "model_type" in arch:
                return arch, str(path)
    return None


# ---------------------------------------------------------------- counting parameters


@dataclass(frozen=True)
class _Linear:
    name: str  # module path, e.g. model.layers.3.self_attn.q_proj
    in_features: int
    out_features: int
    quantized: bool  # bitsandbytes would make it a Linear4bit under nf4
    layer: int | None  # decoder block index; None outside the blocks (e.g. lm_head)


@dataclass(frozen=True)
class _Layout:
    """What the estimate needs from a model, read off its meta-device instance."""

    total_params: int  # tied weights counted once
    linears: tuple[_Linear, ...]
    embeddings: tuple[tuple[str, int, int], ...]  # (name, num_embeddings, embedding_dim)
    unquantized_params: int  # parameters nf4 leaves in floating point (embeddings, norms, head, biases)
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)


def _block_index(name: str) -> int | None:
    # Decoder blocks live in a ModuleList, so their modules are named ...layers.<i>.... (or h.<i>).
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in {"layers", "h", "blocks", "layer"} and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


@functools.lru_cache(maxsize=8)
def _layout(arch_json: str) -> _Layout:
    """Build the model on the meta device (no memory, a second or two even for 7B) and read it."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = json.loads(arch_json)
    if arch.get("auto_map"):
        raise ValueError(f"memory: model_type {arch.get('model_type')!r} needs the repository's own code "
                         "(auto_map); no estimate without running it")
    try:
        config = AutoConfig.for_model(**arch)
    except (ValueError, KeyError) as e:
        raise ValueError(f"memory: transformers does not know model_type {arch.get('model_type')!r} ({e})") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # init_empty_weights re-registers every parameter on the meta device, which undoes the tie made
    # in post_init (Qwen3-4B would count its 389M-parameter head twice: 4.41e9 instead of 4.02e9).
    model.tie_weights()

    # Which Linear layers bitsandbytes quantizes: transformers' Bnb4BitHfQuantizer calls
    # get_modules_to_not_convert(model, llm_int8_skip_modules=None, ...), which with no skip list
    # falls back to get_keys_to_not_convert(model): tied weights, the last parameter's module and the
    # output embeddings (lm_head) stay unquantized; replace_with_bnb_linear then swaps every other
    # module whose type is exactly nn.Linear (transformers/quantizers/base.py,
    # transformers/integrations/bitsandbytes.py, transformers 5.x).
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = get_keys_to_not_convert(model)
    except Exception:  # older or newer layout: keep the head unquantized, as every version does
        head = model.get_output_embeddings()
        skip = [n for n, m in model.named_modules() if m is head]

        def should_convert_module(name: str, patterns: list[str]) -> bool:
            return not any(name == p or name.startswith(p + ".") or name.endswith(p) for p in patterns)

    linears, embeddings = [], []
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            linears.append(_Linear(name, module.in_features, module.out_features,
                                   should_convert_module(name, skip), _block_index(name)))
        elif isinstance(module, torch.nn.Embedding):
            embeddings.append((name, module.num_embeddings, module.embedding_dim))
    params = dict(model.named_parameters())  # deduplicated: a tied head appears once
    total = sum(p.numel() for p in params.values())
    quantized = sum(lin.in_features * lin.out_features for lin in linears if lin.quantized)

    text = getattr(config, "get_text_config", lambda: config)()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    blocks = [lin for lin in linears if lin.layer is not None]
    biggest_block_out = max((lin.out_features for lin in blocks), default=4 * hidden)
    return _Layout(
        total_params=total,
        linears=tuple(linears),
        embeddings=tuple(embeddings),
        unquantized_params=total - quantized,
        num_layers=text.num_hidden_layers,
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", None) or biggest_block_out,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        qk_norm=any(n.endswith(("q_norm", "k_norm")) for n, _ in model.named_modules()),
    )


def _is_lora_target(name: str, targets: list[str]) -> bool:
    # peft's rule for a list of target_modules (check_target_module_exists): the module's name
    # equals a target or ends with "." + target.
    return any(name == t or name.endswith("." + t) for t in targets)


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight of numel elements as bitsandbytes NF4 with double quantization."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    return (math.ceil(numel / 2)  # two 4-bit codes per byte
            + blocks  # uint8 absmax per 64-weight block
            + 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE)  # fp32 absmax per 256 blocks
            + _NF4_PER_TENSOR_BYTES)


# ---------------------------------------------------------------- activations

# Which tensor feeds a LoRA target in a Llama-style block: targets fed by the same tensor can share
# one saved copy of it (see _lora_bytes_per_token). Unknown names get a copy each.
_LORA_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}


def _lora_bytes_per_token(lay: _Layout, model_cfg: ModelConfig, autocast: bool,
                          input_bytes: dict[str, int]) -> float:
    """Bytes the LoRA branches of one block keep per token (peft lora.Linear / lora.bnb.Linear4bit).

    lora_A keeps its input: without autocast peft first casts x to the adapter's float32 (a new
    4-byte copy unless x is fp32 already); under autocast F.linear keeps a 16-bit cast instead.
    Dropout (p > 0) makes a new tensor per adapter and keeps a 1-byte bool mask (CUDA's
    native_dropout). With neither a cast nor dropout, adapters fed by the same tensor (q/k/v, say)
    keep that one tensor. lora_B keeps lora_A's r-wide output.
    """
    r, targets = model_cfg.lora_r, list(model_cfg.lora_target_modules)
    dropout = model_cfg.lora_dropout > 0
    kept_bytes = 2 if autocast else 4
    total, shared = 0.0, set()
    for lin in lay.linears:  # block 0 stands for all: Llama / Qwen3 blocks are alike
        if lin.layer != 0 or not _is_lora_target(lin.name, targets):
            continue
        source = _LORA_INPUTS.get(lin.name.rsplit(".", 1)[-1])
        own_copy = dropout or input_bytes.get(source, 0) != kept_bytes or source is None
        if own_copy:
            total += lin.in_features * kept_bytes
        elif source not in shared:
            shared.add(source)
            total += lin.in_features * kept_bytes
        total += lin.in_features * (1 if dropout else 0) + r * kept_bytes
    return total


def _activation_bytes_per_token(lay: _Layout, model_cfg: ModelConfig, mixed_precision: str) -> dict[str, float]:
    """Bytes one decoder block keeps for backward, per token, by kind (and the dtypes used).

    The method is Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models" (arXiv:2205.05198), Sec. 4.1: add up the tensors each op saves for backward. Their
    s*b*h*(34 + 5*a*s/h) bytes per GPT layer (16-bit, no recomputation) assumes every weight is
    trained (so every Linear keeps its input), a 4h GELU MLP, LayerNorm and dropout everywhere.
    Redone for this path (Llama / Qwen3 blocks, frozen base, LoRA), and checked op by op with
    torch.autograd.graph.saved_tensors_hooks on rerank_dist.modeling.load_model:

    * a frozen Linear (16-bit, or bnb Linear4bit) keeps nothing per token: its input gradient
      needs only the weight;
    * each of the two RMSNorms keeps its input upcast to float32 (4h); Qwen3's per-head q/k
      norms keep q and k in float32;
    * SDPA (memory-efficient / flash kernels) keeps q, k, v and its output, plus a float32
      logsumexp per head. There is no a*s^2 term: the 5as/h score/softmax/dropout term of
      Korthikanti's formula is exactly what these kernels never store. The padding mask of a
      left-padded batch rules out SDPA's native GQA (transformers' use_gqa_in_sdpa), so k and v
      are repeated to all heads first: 4 x q_dim;
    * the SwiGLU MLP keeps silu's input, silu's output and up_proj's output: 3 x intermediate
      (down_proj's input only when down_proj has an adapter);
    * LoRA adapters: see _lora_bytes_per_token.
    """
    h, i = lay.hidden, lay.intermediate
    q_dim, kv_dim = lay.heads * lay.head_dim, lay.kv_heads * lay.head_dim
    dtype_bytes = _DTYPE_BYTES[model_cfg.dtype]
    autocast = mixed_precision in {"bf16", "fp16"}
    nf4 = model_cfg.quantization == "nf4"
    # Residual stream: float32 under nf4 (the embedding was upcast, and fp32 residual + 16-bit
    # branch stays fp32), else the weights' dtype (autocast does not touch the residual adds).
    residual = 4 if nf4 else dtype_bytes
    # Attention tensors: 16-bit under autocast (SDPA is an autocast op), else the stream's dtype.
    attn = 2 if autocast else residual
    # MLP tensors: Linear4bit hands back its input's dtype (fp32) even under autocast, and silu and
    # mul are not autocast ops; a plain model computes them in 16 bits under autocast.
    mlp = residual if nf4 else (2 if autocast else dtype_bytes)
    lora_inputs = {"attn_in": residual, "attn_out": attn, "mlp_in": residual, "mlp_mid": mlp}
    return {
        "norms": 2 * h * 4.0,
        "qk_norms": (q_dim + kv_dim) * 4.0 if lay.qk_norm else 0.0,
        "attention": 4 * q_dim * attn + lay.heads * 4.0,
        "mlp": 3 * i * mlp,
        "lora": _lora_bytes_per_token(lay, model_cfg, autocast, lora_inputs),
        "residual_bytes": residual,
        "mlp_bytes": mlp,
    }


# ---------------------------------------------------------------- the estimate


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def estimate_training_memory(arch: dict, model_cfg: ModelConfig, micro_batch: int, seq_len: int,
                             world_size: int = 1, *, mixed_precision: str = "no") -> dict:
    """Bytes per device for DDP LoRA / QLoRA training of the model that ``arch`` (config.json) describes.

    Every process holds the whole model, so world_size only adds DDP's gradient buckets.
    ``mixed_precision`` is train.mixed_precision (no | bf16 | fp16): autocast changes which
    activations are 16-bit. Returns the parts in bytes (``weights``, ``lora_adamw``,
    ``ddp_buckets``, ``activations``, ``overhead``) and their ``total``, plus ``trainable_params``,
    ``total_params``, ``detail`` (the sub-parts, in bytes) and a one-line ``summary``.

    An estimate of the steady training peak: it leaves out load-time transients, fragmentation
    beyond the fixed overhead, and other processes on the device. Raises ValueError for a
    model_type transformers cannot build from config alone.
    """
    if micro_batch < 1 or seq_len < 1 or world_size < 1:
        raise ValueError(f"memory: micro_batch, seq_len and world_size must be >= 1, got "
                         f"{micro_batch}, {seq_len}, {world_size}")
    lay = _layout(json.dumps(arch, sort_keys=True))
    nf4 = model_cfg.quantization == "nf4"
    dtype_bytes = _DTYPE_BYTES[model_cfg.dtype]
    targets = list(model_cfg.lora_target_modules)
    tokens = micro_batch * seq_len  # B x L positions through every block

    # Base weights. nf4: Linear4bit storage for the quantized layers; everything else float32,
    # because prepare_model_for_kbit_training casts all non-Params4bit 16-bit parameters up.
    quantized = [lin for lin in lay.linears if lin.quantized] if nf4 else []
    w_quant = sum(nf4_bytes(lin.in_features * lin.out_features) for lin in quantized)
    plain_params = lay.unquantized_params if nf4 else lay.total_params
    w_plain = plain_params * (4 if nf4 else dtype_bytes)

    # LoRA: lora_A (r x in) + lora_B (out x r) on every matching Linear; lora_embedding_A/B
    # (r x num, dim x r) on a matching Embedding. float32, trained with AdamW.
    r = model_cfg.lora_r
    trainable = sum(r * (lin.in_features + lin.out_features)
                    for lin in lay.linears if _is_lora_target(lin.name, targets))
    trainable += sum(r * (num + dim) for name, num, dim in lay.embeddings if _is_lora_target(name, targets))
    lora_adamw = trainable * ADAMW_BYTES_PER_TRAINABLE
    ddp_buckets = trainable * DDP_BUCKET_BYTES_PER_TRAINABLE if world_size > 1 else 0

    per_tok = _activation_bytes_per_token(lay, model_cfg, mixed_precision)
    residual, mlp = per_tok["residual_bytes"], per_tok["mlp_bytes"]
    layer_full = tokens * sum(per_tok[k] for k in ("norms", "qk_norms", "attention", "mlp", "lora"))
    if model_cfg.gradient_checkpointing:
        # Each block keeps only its input hidden state (B, L, h); in backward one block at a time
        # is re-run and its full activations exist again while it is differentiated.
        kept = lay.num_layers * tokens * lay.hidden * residual + layer_full
    else:
        kept = lay.num_layers * layer_full
    # After the blocks: the final norm's fp32 input, its output (held by the answer-position
    # slice that reaches the head), and (B, 1, V) logits with their fp32 copy; no (B, L, V) tensor.
    head = tokens * lay.hidden * (4 + residual) + micro_batch * lay.vocab * 4 * 2
    # Transients of the block being differentiated: gradients of the residual stream in and out
    # (B, L, h) and of the two MLP branches (B, L, intermediate), plus bitsandbytes' dequantized
    # copy of the largest 4-bit weight (16-bit) during its matmul.
    working = tokens * (2 * lay.hidden * residual + 2 * lay.intermediate * mlp)
    working += max((lin.in_features * lin.out_features for lin in quantized), default=0) * 2
    activations = int(kept + head + working)

    weights = w_quant + w_plain
    total = weights + lora_adamw + ddp_buckets + activations + OVERHEAD_BYTES
    weights_note = (f"{_gib(weights)} nf4 ({_gib(w_quant)} 4-bit + {_gib(w_plain)} fp32 embeddings/norms/head)"
                    if nf4 else f"{_gib(weights)} {model_cfg.dtype}")
    ddp_note = f", DDP buckets {ddp_buckets / GIB:.2f}" if world_size > 1 else ""
    if mixed_precision != "no":
        act_note = f"autocast {mixed_precision}"
    else:
        act_note = "fp32" if residual == 4 else model_cfg.dtype
    summary = (f"≈ {_gib(total)} GiB per device (weights {weights_note}, LoRA+AdamW {_gib(lora_adamw)}"
               f"{ddp_note}, activations {_gib(activations)} {act_note} at micro-batch {micro_batch} x {seq_len} "
               f"tokens, checkpointing {'on' if model_cfg.gradient_checkpointing else 'off'}, "
               f"+{OVERHEAD_BYTES / GIB:.2f} overhead)")
    return {
        "weights": weights,
        "lora_adamw": lora_adamw,
        "ddp_buckets": ddp_buckets,
        "activations": activations,
        "overhead": OVERHEAD_BYTES,
        "total": total,
        "trainable_params": trainable,
        "total_params": lay.total_params,
        "detail": {
            "weights_4bit": w_quant,
            "weights_unquantized": w_plain,
            "quantized_params": sum(lin.in_features * lin.out_features for lin in quantized),
            "activations_per_layer_full": int(layer_full),
            "activations_kept": int(kept),
            "activations_head": int(head),
            "activations_working": int(working),
        },
        "summary": summary,
    }
