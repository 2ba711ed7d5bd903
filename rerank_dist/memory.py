"""Memory per device for LoRA / QLoRA training, estimated from a model's config.json alone.

``--dry-run`` prints this before anything is downloaded or loaded, so it must work offline and
fast: ``find_architecture`` reads config.json from a local directory, the Hugging Face cache or
the architecture files shipped in ``configs/models/``; ``estimate_training_memory`` builds the
model on the meta device (no storage), counts parameters by module, and adds up bytes per part
under each backend (``train.backend``): ddp and zero2 keep the whole base model on every process,
zero3 and fsdp a 1/W shard of it plus the weights being computed, held whole for the time.

What the numbers follow is this repository's own training path (``rerank_dist.modeling``):

* nf4: transformers replaces every plain ``nn.Linear`` except the output head with a bitsandbytes
  ``Linear4bit`` (NF4, blocksize 64, double quant), then (ddp, zero2) ``peft.prepare_model_for_kbit_training``
  casts *every other* 16-bit parameter (embeddings, norms, the head) to float32. The fp32
  embedding makes the residual stream float32, and ``Linear4bit`` returns its input's dtype, so
  without autocast (``train.mixed_precision=no``, the default) activations are float32 too.
  Sharding backends (zero3, fsdp) skip that upcast and store the 4-bit codes as the compute
  dtype; DeepSpeed's bf16/fp16 mode casts the model itself (see ``_precision``).
* LoRA adapters are PEFT's own: ``get_peft_model`` with training's ``modeling.lora_config``
  applied to the meta model, so which modules and blocks get one (model.lora_target_modules,
  model.lora_layers) and their shapes are PEFT's decision, counted rather than re-derived.
* LoRA weights are float32 and trained with torch AdamW: 4 weight + 4 grad + 8 moments bytes
  under DDP; DeepSpeed and FSDP partition the optimizer state (see ``estimate_training_memory``).
* Only the answer position reaches the LM head (``logits_to_keep=1``, see ``label_scoring``):
  there is no (B, L, V) logits tensor to count.

The DDP estimate was checked against torch.cuda.max_memory_allocated() over two real training
steps on an H200 (random weights with Qwen3-4B's and Llama-2-7B's real widths and vocabularies,
4 blocks, 1536 tokens; nf4 with and without checkpointing, with autocast, and plain bf16): the
estimate less its fixed overhead came within 5% (0.99-1.04x) in every case (tests/test_memory.py,
marked gpu). The zero2 / zero3 / fsdp parts are modelled from the DeepSpeed, accelerate and torch
sources named where each is computed; they have not been measured.

accelerate has an estimator (``accelerate estimate-memory``, accelerate/commands/estimate.py) but
it does not fit here: ``create_empty_model`` asks the hub for model info first (network), and
``estimate_training_usage`` assumes full fine-tuning (Adam state for every parameter) and ignores
activations. Its building blocks are reused: ``init_empty_weights`` for the meta model, and
transformers' own ``get_keys_to_not_convert`` / ``should_convert_module`` to decide, as
``from_pretrained`` would, which Linear layers bitsandbytes quantizes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rerank_dist.config import ModelConfig, checkpointing_on
from rerank_dist.hardware import planned_dtype

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
class _Param:
    """One parameter as a sharding backend sees it (a tied weight appears once)."""

    name: str
    shape: tuple[int, ...]
    layer: int | None  # decoder block index; None outside the blocks
    quantized: bool  # the weight of a Linear that bitsandbytes would make a Linear4bit under nf4
    tail: bool  # used last in forward and first in backward: final norm, output head (a tied embedding too)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _Layout:
    """What the estimate needs from a model, read off its meta-device instance."""

    arch_json: str  # the config.json it was built from (sorted keys): the adapters are built from it too
    total_params: int  # tied weights counted once
    params: tuple[_Param, ...]  # every parameter, tied weights once
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


def _meta_model(arch_json: str) -> Any:
    """The model config.json describes, built on the meta device (no memory, a second or two even for 7B)."""
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
    return model


@functools.lru_cache(maxsize=8)
def _layout(arch_json: str) -> _Layout:
    """Build the model on the meta device and read it."""
    import torch

    model = _meta_model(arch_json)
    config = model.config

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
    quantized_weights = {f"{lin.name}.weight" for lin in linears if lin.quantized}
    # The tail: parameters outside the blocks other than an untied input embedding (the final norm and
    # the head). A tied embedding is the head's weight, so it belongs to the tail as well.
    embed_in, head_out = model.get_input_embeddings(), model.get_output_embeddings()
    input_ids = {id(p) for p in embed_in.parameters()} if embed_in is not None else set()
    head_ids = {id(p) for p in head_out.parameters()} if head_out is not None else set()
    param_list = tuple(
        _Param(name, tuple(p.shape), _block_index(name), name in quantized_weights,
               _block_index(name) is None and (id(p) not in input_ids or id(p) in head_ids))
        for name, p in params.items())

    text = getattr(config, "get_text_config", lambda: config)()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    blocks = [lin for lin in linears if lin.layer is not None]
    biggest_block_out = max((lin.out_features for lin in blocks), default=4 * hidden)
    return _Layout(
        arch_json=arch_json,
        total_params=total,
        params=param_list,
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


@dataclass(frozen=True)
class _Adapters:
    """The LoRA adapters PEFT adds to a model, read off a meta-device PeftModel."""

    params: tuple[_Param, ...]  # lora_A / lora_B (lora_embedding_A / _B on an Embedding), as PEFT shapes them
    linears: tuple[_Linear, ...]  # the Linear layers PEFT adapted
    blocks: tuple[int, ...]  # decoder blocks with an adapter (the last model.lora_layers, or all)


def _adapters(lay: _Layout, model_cfg: ModelConfig) -> _Adapters:
    """PEFT's adapters for model_cfg's LoRA settings on the model lay was read from."""
    return _peft_adapters(lay.arch_json, model_cfg.lora_r, model_cfg.lora_alpha,
                          tuple(model_cfg.lora_target_modules), model_cfg.lora_layers)


@functools.lru_cache(maxsize=16)
def _peft_adapters(arch_json: str, r: int, alpha: int, targets: tuple[str, ...], lora_layers: int) -> _Adapters:
    """get_peft_model on the meta-device model, with the LoraConfig training uses (modeling.lora_config):
    which modules match model.lora_target_modules and model.lora_layers is PEFT's decision, not a copy of it."""
    import torch
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from rerank_dist.modeling import lora_config, num_decoder_layers

    model = _meta_model(arch_json)
    cfg = ModelConfig(lora_r=r, lora_alpha=alpha, lora_target_modules=list(targets), lora_layers=lora_layers)
    # The adapters' own weights on the meta device too: nothing is allocated, even for a 7B model.
    with init_empty_weights(include_buffers=False):
        peft_model = get_peft_model(model, lora_config(cfg, num_decoder_layers(model)))
    prefix = "base_model.model."  # PeftModel -> LoraModel -> the model: names as in the bare model

    def bare(name: str) -> str:
        return name[len(prefix):] if name.startswith(prefix) else name

    params = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:  # only the adapters: get_peft_model freezes the rest
            name = bare(name)
            layer = _block_index(name)
            # An adapter on the head goes where the head goes (the tail); one on the embedding does not.
            tail = layer is None and "lora_embedding_" not in name
            params.append(_Param(name, tuple(p.shape), layer, False, tail))
    linears = tuple(_Linear(bare(name), m.in_features, m.out_features, False, _block_index(bare(name)))
                    for name, m in peft_model.named_modules()
                    if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), torch.nn.Linear))
    blocks = tuple(sorted({prm.layer for prm in params if prm.layer is not None}))
    return _Adapters(params=tuple(params), linears=linears, blocks=blocks)


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


def _lora_bytes_per_token(lay: _Layout, model_cfg: ModelConfig, kept_bytes: int,
                          input_bytes: dict[str, int]) -> float:
    """Bytes the LoRA branches of one adapted block keep per token (peft lora.Linear / lora.bnb.Linear4bit);
    0 when no block has an adapter.

    lora_A keeps its input: without autocast peft first casts x to the adapter's dtype (a new copy
    unless x has that dtype already); under autocast F.linear keeps a 16-bit cast instead.
    kept_bytes is the element size of what is kept (2 under autocast, else the adapter's).
    Dropout (p > 0) makes a new tensor per adapter and keeps a 1-byte bool mask (CUDA's
    native_dropout). With neither a cast nor dropout, adapters fed by the same tensor (q/k/v, say)
    keep that one tensor. lora_B keeps lora_A's r-wide output.
    """
    r = model_cfg.lora_r
    dropout = model_cfg.lora_dropout > 0
    adapters = _adapters(lay, model_cfg)
    if not adapters.blocks:
        return 0.0
    total, shared = 0.0, set()
    for lin in adapters.linears:  # the first adapted block stands for all: Llama / Qwen3 blocks are alike
        if lin.layer != adapters.blocks[0]:
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


@dataclass(frozen=True)
class _Precision:
    """The dtypes training computes in, which the backend decides as much as the config does."""

    residual: int  # bytes per element of the residual stream (the embedding's output dtype)
    weights: int  # bytes per element of the non-quantized base weights
    autocast: bool  # torch autocast (16-bit) around forward and backward
    lora: int  # bytes per element of the LoRA weights (peft casts a branch's input to them)
    label: str  # how the summary names it


def _ddp_precision(model_cfg: ModelConfig, mixed_precision: str) -> _Precision:
    """DDP (and a single process): prepare_model_for_kbit_training upcasts the embedding under nf4,
    so the residual stream is float32; accelerate wraps forward in autocast for bf16 / fp16."""
    dtype_bytes = _DTYPE_BYTES[model_cfg.dtype]
    residual = 4 if model_cfg.quantization == "nf4" else dtype_bytes
    autocast = mixed_precision in {"bf16", "fp16"}
    label = f"autocast {mixed_precision}" if autocast else ("fp32" if residual == 4 else model_cfg.dtype)
    return _Precision(residual=residual, weights=dtype_bytes, autocast=autocast, lora=4, label=label)


def _activation_bytes_per_token(lay: _Layout, model_cfg: ModelConfig, mixed_precision: str,
                                precision: _Precision | None = None) -> dict[str, float]:
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

    precision: the dtypes (default: DDP's, from model_cfg and mixed_precision; see _precision for
    the other backends).
    """
    h, i = lay.hidden, lay.intermediate
    q_dim, kv_dim = lay.heads * lay.head_dim, lay.kv_heads * lay.head_dim
    prec = precision if precision is not None else _ddp_precision(model_cfg, mixed_precision)
    dtype_bytes = prec.weights
    autocast = prec.autocast
    nf4 = model_cfg.quantization == "nf4"
    # Residual stream: the embedding's dtype (float32 under DDP's nf4 path, where the embedding was
    # upcast, and fp32 residual + 16-bit branch stays fp32); autocast does not touch the residual adds.
    residual = prec.residual
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
        "lora": _lora_bytes_per_token(lay, model_cfg, 2 if autocast else prec.lora, lora_inputs),
        "residual_bytes": residual,
        "mlp_bytes": mlp,
    }


# ---------------------------------------------------------------- backends

BACKENDS = ("ddp", "zero2", "zero3", "fsdp")
BACKEND_NAMES = {"ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP2"}
# The backends whose estimate a GPU measurement has checked (see the module docstring); the others
# are modelled from the libraries' sources only, and the dry run says so.
MEASURED_BACKENDS = ("ddp",)
# The DeepSpeed settings rerank_dist.distributed.deepspeed_config writes, in elements.
DS_REDUCE_BUCKET = 50_000_000  # reduce_bucket_size
ZERO3_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters
ZERO3_MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance
# FSDP2 decoder layers whole at once: the one computing and the next one, whose all-gather FSDP
# issues ahead (forward: the next layer's all-gather on its own stream; backward: the previous
# layer, prefetched by default). An assumption, not counted from a trace.
FSDP_GATHERED_BLOCKS = 2


def _precision(backend: str, model_cfg: ModelConfig, mixed_precision: str) -> _Precision:
    """The dtypes each backend trains in, as this repository builds it (rerank_dist.distributed,
    rerank_dist.modeling) and as the installed libraries then act (sources read: DeepSpeed 0.19.8
    runtime/engine.py, runtime/zero/stage_1_and_2.py, stage3.py, partition_parameters.py; accelerate
    1.15 accelerator.py and utils/fsdp_utils.py; torch 2.13 distributed/fsdp/_fully_shard).

    * zero2 / zero3: deepspeed_config turns DeepSpeed's own bf16 / fp16 mode on for
      train.mixed_precision=bf16 / fp16, and accelerate then runs no autocast (native_amp is off
      under DeepSpeed). ZeRO-2: the engine casts every floating parameter to 16 bits
      (engine._cast_module_mixed_precision), the fp32 embeddings/norms of
      prepare_model_for_kbit_training and the LoRA weights included. ZeRO-3: the base model is
      built inside zero.Init, which creates it in DeepSpeed's dtype (16 bits, else float32); the
      engine casts nothing more once any parameter is a ZeRO one, so the LoRA weights, which peft
      adds later in float32, stay float32.
    * fsdp: no prepare_model_for_kbit_training, so the embedding stays in the model dtype;
      accelerate's autocast as under DDP, and its MixedPrecisionPolicy gathers the LoRA weights in
      16 bits (param_dtype) for compute. accelerate's fp32 upcast of trainable parameters is skipped
      for a model with Params4bit, and LoRA weights are float32 already.
    """
    if backend == "ddp":
        return _ddp_precision(model_cfg, mixed_precision)
    dtype_bytes = _DTYPE_BYTES[model_cfg.dtype]
    half = mixed_precision in {"bf16", "fp16"}
    half_name = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, "")
    if backend == "zero2":
        if half:
            return _Precision(residual=2, weights=2, autocast=False, lora=2, label=f"{half_name} (DeepSpeed {mixed_precision})")
        return _ddp_precision(model_cfg, mixed_precision)
    if backend == "zero3":
        b = 2 if half else 4
        return _Precision(residual=b, weights=b, autocast=False, lora=4,
                          label=f"{half_name} (DeepSpeed {mixed_precision})" if half else "fp32")
    if backend == "fsdp":
        return _Precision(residual=dtype_bytes, weights=dtype_bytes, autocast=half, lora=2 if half else 4,
                          label=f"autocast {mixed_precision}" if half else model_cfg.dtype)
    raise ValueError(f"memory: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class _Stored:
    """One parameter as a backend stores it on a device, before any sharding."""

    param: _Param
    shape: tuple[int, ...]  # as stored: NF4 codes are a (elements, 1) tensor of the storage dtype
    elem_bytes: int
    lora: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.elem_bytes


def _stored(lay: _Layout, model_cfg: ModelConfig, backend: str, mixed_precision: str) -> tuple[list[_Stored], int]:
    """Every base and LoRA parameter in the backend's storage, and the bytes of NF4 quantization
    statistics that are not parameters (so no backend shards them).

    ddp / zero2: NF4 weights as DDP holds them (nf4_bytes, statistics included); the other base
    parameters float32 under nf4 (prepare_model_for_kbit_training), or 16-bit where DeepSpeed's
    bf16/fp16 mode casts them (zero2, see _precision). zero3 / fsdp: NF4 codes stored as the
    compute dtype (bnb_4bit_quant_storage; bitsandbytes makes a ((n + 1) // (2 * itemsize), 1)
    tensor: the same bytes as uint8 packing), the absmax statistics and code tables in each
    Params4bit's quant_state, a plain attribute every process keeps whole; the other base
    parameters in the model dtype (fsdp) or DeepSpeed's (zero3). LoRA weights float32, except
    16-bit under ZeRO-2's bf16/fp16 mode.
    """
    nf4 = model_cfg.quantization == "nf4"
    dtype_bytes = _DTYPE_BYTES[model_cfg.dtype]
    half = mixed_precision in {"bf16", "fp16"}
    sharded = backend in {"zero3", "fsdp"}
    upcast = nf4 and model_cfg.upcast_fp32  # model.upcast_fp32=false keeps them in the model dtype
    plain_bytes = {"ddp": 4 if upcast else dtype_bytes,
                   "zero2": 2 if half else (4 if upcast else dtype_bytes),
                   "zero3": 2 if half else 4,
                   "fsdp": dtype_bytes}[backend]
    lora_bytes = 2 if backend == "zero2" and half else 4
    storage_bytes = 2 if model_cfg.dtype == "bfloat16" else 4  # modeling._quantization_config: compute dtype
    entries: list[_Stored] = []
    statistics = 0
    for prm in lay.params:
        if nf4 and prm.quantized:
            if sharded:
                entries.append(_Stored(prm, ((prm.numel + 1) // (2 * storage_bytes), 1), storage_bytes, False))
                statistics += nf4_bytes(prm.numel) - math.ceil(prm.numel / 2)
            else:
                entries.append(_Stored(prm, (nf4_bytes(prm.numel),), 1, False))
        else:
            entries.append(_Stored(prm, prm.shape, plain_bytes, False))
    entries += [_Stored(prm, prm.shape, lora_bytes, True) for prm in _adapters(lay, model_cfg).params]
    return entries, statistics


def _shard_bytes(entry: _Stored, backend: str, world_size: int) -> int:
    """Bytes of one process's shard. ZeRO-3 pads the flattened tensor to a multiple of the world
    size (partition_parameters._aligned_size); FSDP2 chunks dim 0, padding it to a multiple."""
    if backend == "fsdp":
        rows = math.ceil(entry.shape[0] / world_size)
        return rows * math.prod(entry.shape[1:]) * entry.elem_bytes
    return math.ceil(entry.numel / world_size) * entry.elem_bytes


def _persistent(entry: _Stored) -> bool:
    """ZeRO-3 keeps a parameter of at most this many elements whole on every process once gathered
    (ds_persist, parameter_offload.mark_persistent_parameters); its partition stays too."""
    return entry.numel <= ZERO3_PERSISTENCE_THRESHOLD


def _zero3_gathered(entries: list[_Stored], num_layers: int, checkpointing: bool) -> tuple[int, float]:
    """Bytes ZeRO-3 holds whole, beyond the persistent parameters, where activations peak: the turn
    from forward to backward. And how many decoder blocks that is.

    A model of DeepSpeed's PartitionedParameterCoordinator, not a trace. A parameter is released
    after its module runs unless the parameters traversed before its next use (the trace's numel)
    stay under stage3_max_reuse_distance. At the turn that keeps the head and final norm (used in
    forward, at once again in backward) and the last blocks: block j from the end is next used
    after j blocks and the tail twice, j * B * passes + 2 * T elements later (passes: forward and
    backward, plus the recomputed forward under checkpointing). An untied input embedding stays
    only if a whole step traverses fewer elements. Then prefetching gathers up to
    stage3_prefetch_bucket_size elements of the next blocks, within stage3_max_live_parameters.
    Elements are what DeepSpeed counts: a packed NF4 weight of n values is n / 4 bf16 elements.
    """
    blocks = max([e.param.layer for e in entries if e.param.layer is not None], default=-1) + 1
    n = max(num_layers, blocks)
    block_elems, block_bytes = [0] * n, [0] * n
    tail_elems = tail_bytes = embed_elems = embed_bytes = 0
    for e in entries:
        whole = 0 if _persistent(e) else e.nbytes  # persistent ones are counted with the weights
        if e.param.layer is not None:
            block_elems[e.param.layer] += e.numel
            block_bytes[e.param.layer] += whole
        elif e.param.tail:
            tail_elems, tail_bytes = tail_elems + e.numel, tail_bytes + whole
        else:
            embed_elems, embed_bytes = embed_elems + e.numel, embed_bytes + whole
    if n == 0:
        return tail_bytes, 0.0
    b, b_bytes = sum(block_elems) / n, sum(block_bytes) / n  # blocks are alike: their mean
    passes = 3 if checkpointing else 2
    kept = sum(1 for j in range(n) if j * b * passes + 2 * tail_elems < ZERO3_MAX_REUSE_DISTANCE)
    current = max(kept, 1)  # the last block, recomputed / differentiated first, is whole in any case
    embed_kept = embed_elems > 0 and embed_elems + n * b * passes + 2 * tail_elems < ZERO3_MAX_REUSE_DISTANCE
    available = current * b + tail_elems + (embed_elems if embed_kept else 0)
    prefetch = max(0.0, min(ZERO3_PREFETCH_BUCKET, ZERO3_MAX_LIVE_PARAMETERS - available, (n - current) * b))
    whole_blocks = current + (prefetch / b if b else 0.0)
    return int(whole_blocks * b_bytes) + tail_bytes + (embed_bytes if embed_kept else 0), whole_blocks


def _fsdp_gathered(entries: list[_Stored], mixed_precision: str, nf4: bool) -> tuple[int, float]:
    """Bytes FSDP2 holds whole at the turn from forward to backward, and the decoder blocks counted.

    accelerate 1.15 (utils/fsdp_utils.fsdp2_prepare_model) calls fully_shard on every decoder layer
    (reshard_after_forward=True), on an untied input embedding alone (freed after its forward), and
    on the tail [final norm, head (+ a tied embedding)] with reshard_after_forward=False, so the tail
    stays whole from the end of forward through the start of backward, where activations peak. Plus
    FSDP_GATHERED_BLOCKS decoder layers. The MixedPrecisionPolicy of bf16 / fp16 all-gathers every
    floating parameter in 16 bits (NF4 codes stored as bf16 are unchanged by it).
    """
    half = mixed_precision in {"bf16", "fp16"}

    def whole(e: _Stored) -> int:
        return e.numel * (e.elem_bytes if (nf4 and e.param.quantized) or not half else 2)

    per_block: dict[int, int] = {}
    tail = 0
    for e in entries:
        if e.param.layer is not None:
            per_block[e.param.layer] = per_block.get(e.param.layer, 0) + whole(e)
        elif e.param.tail:
            tail += whole(e)
    largest = sorted(per_block.values(), reverse=True)[:FSDP_GATHERED_BLOCKS]
    return tail + sum(largest), float(len(largest))


# ---------------------------------------------------------------- the estimate


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def estimate_scoring_weights(arch: dict, model_cfg: ModelConfig) -> dict:
    """Bytes of the weights one scoring process holds (score.py), both ways it can load them:

    * ``base_and_adapter``: the base as training loaded it (NF4 codes with their statistics under
      nf4, every other parameter in model.dtype: no fp32 upcast at scoring) plus the fp32 adapter;
    * ``merged`` (score.merged_weights): one plain model, every weight in the compute dtype (an NF4
      base is dequantized to it, bf16 for a bfloat16 model, else fp32), the adapter merged in.

    Scoring activations (one batch's, logits_to_keep=1) are not counted.
    """
    lay = _layout(json.dumps(arch, sort_keys=True))
    dtype, _ = planned_dtype(model_cfg.dtype)
    scoring = dataclasses.replace(model_cfg, dtype=dtype, upcast_fp32=False)
    entries, _ = _stored(lay, scoring, "ddp", "no")
    compute_bytes = _DTYPE_BYTES[dtype] if model_cfg.quantization != "nf4" else (2 if dtype == "bfloat16" else 4)
    return {"base_and_adapter": sum(e.nbytes for e in entries), "merged": lay.total_params * compute_bytes,
            "dtype": dtype}


def estimate_training_memory(arch: dict, model_cfg: ModelConfig, micro_batch: int, seq_len: int,
                             world_size: int = 1, *, mixed_precision: str = "no", backend: str = "ddp") -> dict:
    """Bytes per device for LoRA / QLoRA training of the model that ``arch`` (config.json) describes,
    on world_size processes under ``backend`` (train.backend: ddp | zero2 | zero3 | fsdp).

    ``mixed_precision`` is train.mixed_precision (no | bf16 | fp16): it sets autocast (ddp, fsdp) or
    DeepSpeed's 16-bit mode (zero2, zero3), so which weights and activations are 16-bit (see
    _precision). Returns the parts in bytes and their ``total``:

    * ``weights``: the base model as this device keeps it all the time: whole under ddp / zero2;
      under zero3 / fsdp its shard (``sharded_weights``) plus what is never sharded (NF4
      statistics; ZeRO-3's persistent small parameters);
    * ``gathered_working_set``: base and LoRA weights held whole while computed (zero3 / fsdp);
    * ``lora_adamw``: LoRA weights, their gradients and the optimizer state on this device; of it
      ``optimizer_shard``: AdamW's two moments plus DeepSpeed's fp32 master copy;
    * ``ddp_buckets`` (ddp), ``reduce_bucket`` (zero2 / zero3): gradient communication buffers;
    * ``activations`` (the same model for every backend, in the dtypes the backend computes in);
    * ``overhead``.

    Also ``backend``, ``world_size``, ``trainable_params``, ``total_params``, ``detail`` (sub-parts,
    bytes), ``dtype`` / ``dtype_reason`` (model.dtype as counted: auto is taken as bfloat16, the
    estimate being for GPUs, and the summary says so; pass a model_cfg with the dtype a device
    resolved to for anything else) and a one-line ``summary`` naming the backend. An estimate of the
    steady training peak: it leaves out load-time transients, the optimizer step's own temporaries
    (taken after the activations are freed), fragmentation beyond the fixed overhead, and other
    processes on the device. Raises ValueError for a model_type transformers cannot build from config
    alone or an unknown backend.
    """
    if micro_batch < 1 or seq_len < 1 or world_size < 1:
        raise ValueError(f"memory: micro_batch, seq_len and world_size must be >= 1, got "
                         f"{micro_batch}, {seq_len}, {world_size}")
    if backend not in BACKENDS:
        raise ValueError(f"memory: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    lay = _layout(json.dumps(arch, sort_keys=True))
    auto = model_cfg.dtype == "auto"
    dtype, dtype_reason = planned_dtype(model_cfg.dtype)
    model_cfg = dataclasses.replace(model_cfg, dtype=dtype)  # every part below counts concrete bytes
    nf4 = model_cfg.quantization == "nf4"
    tokens = micro_batch * seq_len  # B x L positions through every block
    W = world_size
    half = mixed_precision in {"bf16", "fp16"}
    prec = _precision(backend, model_cfg, mixed_precision)
    entries, statistics = _stored(lay, model_cfg, backend, mixed_precision)
    base = [e for e in entries if not e.lora]
    lora = [e for e in entries if e.lora]
    trainable = sum(e.numel for e in lora)

    # ---- base weights. ddp / zero2: whole on every process. zero3 / fsdp: a shard each, plus the
    # NF4 statistics (not parameters) and, under ZeRO-3, persistent small parameters kept whole.
    def quantized_codes(e: _Stored) -> bool:
        return nf4 and e.param.quantized

    if backend in {"ddp", "zero2"}:
        shards = {id(e): 0 for e in base}
        resident = {id(e): e.nbytes for e in base}
    else:
        shards = {id(e): _shard_bytes(e, backend, W) for e in base}
        resident = {id(e): shards[id(e)] + (e.nbytes if backend == "zero3" and _persistent(e) else 0) for e in base}
    w_quant = sum(resident[id(e)] for e in base if quantized_codes(e)) + statistics
    w_plain = sum(resident[id(e)] for e in base if not quantized_codes(e))
    sharded_weights = sum(shards.values())
    weights = w_quant + w_plain
    whole_model = sum(e.nbytes for e in base) + statistics  # the base model in this backend's storage

    # ---- LoRA weights, gradients, optimizer state and gradient buffers.
    ddp_buckets = reduce_bucket = 0
    if backend == "ddp":
        # fp32 weight 4 + grad 4 + AdamW moments 8; DDP's reducer copies the gradients into its own
        # buckets (Accelerate does not ask for gradient_as_bucket_view) when world_size > 1.
        lora_weights, lora_grads, optimizer_shard = 4 * trainable, 4 * trainable, 8 * trainable
        ddp_buckets = trainable * DDP_BUCKET_BYTES_PER_TRAINABLE if W > 1 else 0
    elif backend == "zero2":
        # stage_1_and_2.DeepSpeedZeroOptimizer: the LoRA weights move into one flat buffer, whole on
        # every process; this process's partition gets an fp32 master copy (a clone even when the
        # weights are fp32) with the AdamW moments, and a gradient partition (grads_in_partition,
        # weight dtype). The reduce bucket is allocated at reduce_bucket_size elements in
        # setup_buckets whatever the number of trainable ones (overlap_comm off: one, not two).
        part = math.ceil(trainable / W)
        lb = lora[0].elem_bytes if lora else 4
        lora_weights, lora_grads, optimizer_shard = lb * trainable, lb * part, (4 + 8) * part
        reduce_bucket = DS_REDUCE_BUCKET * lb
    elif backend == "zero3":
        # stage3.DeepSpeedZeroOptimizer_Stage3: every LoRA weight is partitioned (fp32: the flat
        # partition is its own fp32 master, _create_fp32_partitions reuses it), and kept whole too
        # when it is persistent, as LoRA A/B of rank <= 64 on a 4096-wide layer are. Gradient
        # partitions (grad_partitions_flat_buffer) are in DeepSpeed's gradient dtype (16-bit in its
        # bf16/fp16 mode), as is the reduce bucket, allocated at reduce_bucket_size elements at init.
        grad_bytes = 2 if half else 4
        parts = sum(math.ceil(e.numel / W) for e in lora)
        lora_weights = sum(4 * math.ceil(e.numel / W) + (e.nbytes if _persistent(e) else 0) for e in lora)
        lora_grads, optimizer_shard = grad_bytes * parts, 8 * parts
        reduce_bucket = DS_REDUCE_BUCKET * grad_bytes
    else:
        # FSDP2: LoRA weights, their (reduce-scattered) gradients and AdamW's moments on DTensor
        # shards of dim 0; no master copy (the sharded weights are fp32).
        shard = sum(_shard_bytes(e, "fsdp", W) for e in lora)  # fp32, so bytes = 4 x elements
        lora_weights, lora_grads, optimizer_shard = shard, shard, 2 * shard
    lora_adamw = lora_weights + lora_grads + optimizer_shard

    # ---- weights held whole while computed.
    if backend == "zero3":
        gathered, gathered_blocks = _zero3_gathered(entries, lay.num_layers, checkpointing_on(model_cfg))
    elif backend == "fsdp":
        gathered, gathered_blocks = _fsdp_gathered(entries, mixed_precision, nf4)
    else:
        gathered, gathered_blocks = 0, 0.0

    # ---- activations: data parallel under every backend, so the same model at the same micro-batch,
    # in the dtypes the backend computes in.
    per_tok = _activation_bytes_per_token(lay, model_cfg, mixed_precision, prec)
    residual, mlp = per_tok["residual_bytes"], per_tok["mlp_bytes"]
    adapted_blocks = len(_adapters(lay, model_cfg).blocks)  # model.lora_layers: the last N blocks, or all
    layer_lora = tokens * per_tok["lora"]  # in each adapted block only
    layer_full = tokens * sum(per_tok[k] for k in ("norms", "qk_norms", "attention", "mlp")) + layer_lora
    if checkpointing_on(model_cfg):
        # Each block keeps only its input hidden state (B, L, h); in backward one block at a time
        # is re-run and its full activations exist again while it is differentiated.
        kept = lay.num_layers * tokens * lay.hidden * residual + layer_full
    else:
        kept = lay.num_layers * (layer_full - layer_lora) + adapted_blocks * layer_lora
    # After the blocks: the final norm's fp32 input, its output (held by the answer-position
    # slice that reaches the head), and (B, 1, V) logits with their fp32 copy; no (B, L, V) tensor.
    head = tokens * lay.hidden * (4 + residual) + micro_batch * lay.vocab * 4 * 2
    # Transients of the block being differentiated: gradients of the residual stream in and out
    # (B, L, h) and of the two MLP branches (B, L, intermediate), plus bitsandbytes' dequantized
    # copy of the largest 4-bit weight (16-bit) during its matmul.
    working = tokens * (2 * lay.hidden * residual + 2 * lay.intermediate * mlp)
    quantized_numels = [e.param.numel for e in base if quantized_codes(e)]
    working += max(quantized_numels, default=0) * 2
    activations = int(kept + head + working)

    total = (weights + gathered + lora_adamw + ddp_buckets + reduce_bucket + activations + OVERHEAD_BYTES)
    summary = _summary(backend, W, model_cfg, prec, micro_batch, seq_len,
                       dict(total=total, weights=weights, w_quant=w_quant, w_plain=w_plain, sharded=sharded_weights,
                            whole=whole_model, gathered=gathered, lora_adamw=lora_adamw, ddp_buckets=ddp_buckets,
                            reduce_bucket=reduce_bucket, activations=activations),
                       gathered_blocks, plain_bytes=next((e.elem_bytes for e in base if not quantized_codes(e)), 4))
    if auto:
        summary += f" [{dtype_reason}]"
    return {
        "weights": weights,
        "sharded_weights": sharded_weights,
        "gathered_working_set": gathered,
        "lora_adamw": lora_adamw,
        "optimizer_shard": optimizer_shard,
        "ddp_buckets": ddp_buckets,
        "reduce_bucket": reduce_bucket,
        "activations": activations,
        "overhead": OVERHEAD_BYTES,
        "total": total,
        "backend": backend,
        "world_size": W,
        "trainable_params": trainable,
        "total_params": lay.total_params,
        "dtype": dtype,
        "dtype_reason": dtype_reason,
        "detail": {
            "weights_4bit": w_quant,
            "weights_unquantized": w_plain,
            "weights_never_sharded": weights - sharded_weights if backend in {"zero3", "fsdp"} else 0,
            "weights_whole_model": whole_model,
            "quantized_params": sum(quantized_numels),
            "gathered_blocks": gathered_blocks,
            "lora_weights": lora_weights,
            "lora_grads": lora_grads,
            "activations_per_layer_full": int(layer_full),
            "activations_kept": int(kept),
            "activations_head": int(head),
            "activations_working": int(working),
        },
        "summary": summary,
    }


def _summary(backend: str, world_size: int, model_cfg: ModelConfig, prec: _Precision, micro_batch: int,
             seq_len: int, parts: dict[str, int], gathered_blocks: float, plain_bytes: int) -> str:
    """One line: the total, the backend, and each part in GiB."""
    plain_name = {4: "fp32", 2: "16-bit"}.get(plain_bytes, f"{plain_bytes}-byte")
    nf4 = model_cfg.quantization == "nf4"
    where = f"{BACKEND_NAMES[backend]} on {world_size} process{'es' if world_size > 1 else ''}"
    if backend in {"zero3", "fsdp"}:
        kind = "nf4" if nf4 else model_cfg.dtype
        weights_note = (f"{_gib(parts['weights'])} ({parts['sharded'] / GIB:.2f} = 1/{world_size} of {_gib(parts['whole'])} "
                        f"{kind}, + {(parts['weights'] - parts['sharded']) / GIB:.2f} never sharded), "
                        f"gathered {_gib(parts['gathered'])} ({gathered_blocks:.1f} blocks + head)")
    elif nf4:
        weights_note = (f"{_gib(parts['weights'])} nf4 ({_gib(parts['w_quant'])} 4-bit + {_gib(parts['w_plain'])} "
                        f"{plain_name} embeddings/norms/head)")
    else:
        same = plain_bytes == _DTYPE_BYTES[model_cfg.dtype]
        weights_note = f"{_gib(parts['weights'])} {model_cfg.dtype if same else plain_name}"
    buckets = ""
    if parts["ddp_buckets"]:
        buckets = f", DDP buckets {parts['ddp_buckets'] / GIB:.2f}"
    elif parts["reduce_bucket"]:
        buckets = f", reduce bucket {parts['reduce_bucket'] / GIB:.2f}"
    return (f"≈ {_gib(parts['total'])} GiB per device ({where}: weights {weights_note}, "
            f"LoRA+AdamW {_gib(parts['lora_adamw'])}{buckets}, activations {_gib(parts['activations'])} "
            f"{prec.label} at micro-batch {micro_batch} x {seq_len} tokens, checkpointing "
            f"{'on' if checkpointing_on(model_cfg) else 'off'}, +{OVERHEAD_BYTES / GIB:.2f} overhead)")
