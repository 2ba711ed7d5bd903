"""Building the ranker: tokenizer, backbone (full precision or 4-bit NF4) and LoRA adapters.

No distributed code lives here: the training loop and the scorer own the Accelerator and pass
a device in. Weights are read from safetensors only, and a repository's own Python code runs
only when the config says ``trust_remote_code``. Where the weights come from is
``model_source``; reading label scores off a model is ``label_scoring``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from rerank_dist.config import ModelConfig, checkpointing_on
from rerank_dist.extras import require
from rerank_dist.hardware import resolve_dtype
from rerank_dist.model_source import resolve_model_source

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: ModelConfig, source: Path | str | None = None) -> Any:
    """The model's tokenizer, left-padding, with a pad token."""
    from transformers import AutoTokenizer

    source = source if source is not None else resolve_model_source(cfg)
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    # Left padding puts every prompt's last token at position -1, where the answer logit is read.
    tok.padding_side = "left"
    if tok.pad_token is None:
        # Many causal LMs ship without a pad token. Pad positions are masked out of attention and
        # never used as targets, so reusing EOS is harmless and adds no untrained embedding row.
        tok.pad_token = tok.eos_token
    return tok


def _dtype(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.dtype:
    """cfg.dtype as a torch dtype, auto resolved for device (default: CPU; see rerank_dist.hardware)."""
    return _DTYPES[resolve_dtype(cfg.dtype, device)[0]]


def _quantization_config(cfg: ModelConfig, sharded: bool = False,
                         device: torch.device | str | None = None) -> Any:
    if cfg.quantization != "nf4":
        return None
    require("bitsandbytes", "qlora", "model.quantization=nf4")
    from transformers import BitsAndBytesConfig

    # QLoRA (Dettmers et al.): NF4 storage, double-quantized scales, matmuls in bf16 (or fp32 on CPU).
    compute = torch.bfloat16 if _dtype(cfg, device) == torch.bfloat16 else torch.float32
    # Sharding backends (ZeRO-3, FSDP) cut every weight into flat pieces of one float dtype; packed
    # uint8 4-bit codes cannot be cut that way, the same bytes viewed as the compute dtype can.
    storage = {"bnb_4bit_quant_storage": compute} if sharded else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute, **storage)


def load_base_model(cfg: ModelConfig, device: torch.device | str | None = None,
                    source: Path | str | None = None, sharded: bool = False) -> Any:
    """The backbone alone (no LoRA), in cfg.dtype (auto resolved for device) or NF4, on device (default: CPU).

    sharded: the weights are about to be sharded across processes (ZeRO-3, FSDP; see
    config.SHARDED_BACKENDS). Then no device is given: the backend decides where each shard lives
    (under ZeRO-3 transformers builds the model inside deepspeed.zero.Init, so every weight is
    partitioned as it is loaded and no process holds the whole 16-bit model).
    """
    from transformers import AutoModelForCausalLM

    source = source if source is not None else resolve_model_source(cfg)
    # Under zero3 / fsdp no device_map is passed, but device still names where it will compute.
    dtype, reason = resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = dict(
        dtype=_DTYPES[dtype],
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
    )
    quant = _quantization_config(cfg, sharded, device)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device is not None and not sharded:
        # Each process gets the whole model on its own device; 4-bit weights are quantized there.
        kwargs["device_map"] = {"": torch.device(device)}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    log.info("loaded %s (%s: %s; %s) in %.1f s", source, dtype, reason, cfg.quantization, time.perf_counter() - t0)
    return model


def lora_config(cfg: ModelConfig, num_layers: int | None = None) -> Any:
    """peft LoraConfig; ``num_layers`` (the backbone's decoder layers) is needed when lora_layers > 0."""
    from peft import LoraConfig

    layers = None
    if cfg.lora_layers:
        if num_layers is None:
            raise ValueError("lora_config: model.lora_layers needs the backbone's number of layers")
        if cfg.lora_layers < num_layers:  # else every layer: "the last 10" of a 2-layer model is all of it
            layers = list(range(num_layers - cfg.lora_layers, num_layers))
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), layers_to_transform=layers,
                      task_type="CAUSAL_LM")


def num_decoder_layers(model: Any) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def load_model(cfg: ModelConfig, training: bool, device: torch.device | str | None = None,
               source: Path | str | None = None, sharded: bool = False) -> Any:
    """training=True: the backbone with fresh LoRA adapters, only they trainable, in train mode.

    training=False: the bare backbone in eval mode (the untrained baseline a trained adapter is
    compared against); use load_for_scoring for a trained adapter. sharded: see load_base_model.
    """
    model = load_base_model(cfg, device=device, source=source, sharded=sharded)
    if not training:
        return model.eval()
    from peft import get_peft_model, prepare_model_for_kbit_training

    model.config.use_cache = False  # no generation while training; a KV cache only costs memory
    checkpointing = checkpointing_on(cfg)
    ckpt_kwargs = {"use_reentrant": False}  # non-reentrant checkpointing needs no input-grad hook
    if cfg.quantization == "nf4" and not sharded:
        # Freezes the base, upcasts norms/embeddings to fp32 for stable training, and enables checkpointing.
        loaded = {name: p.dtype for name, p in model.named_parameters()}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
        if not cfg.upcast_fp32:
            # Back to the dtype they were loaded in: under bf16 autocast fp32 norms and embeddings
            # turn much of the activation traffic into fp32 for no gain in the loss (docs/performance.md).
            for name, p in model.named_parameters():
                if p.dtype != loaded[name]:
                    p.data = p.data.to(loaded[name])
    elif checkpointing:
        # Sharded 4-bit weights skip prepare_model_for_kbit_training: its fp32 copies of the
        # embeddings and norms would double their sharded size for no gain in bf16 training.
        _enable_checkpointing(model, ckpt_kwargs)
    if (sharded or cfg.compile != "none") and cfg.quantization == "nf4":
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                # bitsandbytes' CPU kernel repacks a 4-bit weight in place at its first eval-mode
                # forward (validation); a sharded weight gathered for that one forward must keep
                # the layout its shards were cut in, and a compiled layer the shapes it was traced with.
                module.support_avx512bf16_for_cpu = False
    model = get_peft_model(model, lora_config(cfg, num_decoder_layers(model)))
    if cfg.compile != "none":
        compile_decoder_layers(model, cfg.compile)
    return model.train()


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The backbone's decoder layers (the ModuleList named ...layers holding one per layer)."""
    count = num_decoder_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module) == count:
            return list(module)
    raise ValueError(f"{type(model).__name__}: no ModuleList of its {count} decoder layers found to compile")


def compile_decoder_layers(model: Any, backend: str) -> int:
    """Regional torch.compile: each decoder layer compiled in place (nn.Module.compile), its LoRA layers
    inside. The layers share one architecture, so the graph is traced once and reused by every layer
    (a whole-model compile would trace all of them, and recompile for the head's varying inputs)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    log.info("compiled %d decoder layers (torch.compile backend %s)", len(layers), backend)
    return len(layers)


def compile_stats() -> dict[str, int]:
    """What torch.compile did in this process so far (Dynamo's counters): graphs compiled and graph
    breaks. A compiled run with no graph would have fallen back to eager in every layer."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values()))}


def _enable_checkpointing(model: Any, kwargs: dict[str, Any]) -> None:
    # Recent transformers 5.x renamed gradient_checkpointing_enable (now a deprecated alias); older 5.x lack the new name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_for_scoring(cfg: ModelConfig, adapter_dir: Path, device: torch.device | str | None = None,
                     source: Path | str | None = None, merged: bool = False) -> Any:
    """The backbone plus the trained adapter saved in adapter_dir, in eval mode.

    merged (score.merged_weights): the adapter merged into the base weights (PEFT merge_and_unload),
    a plain model with no adapter layers. A 4-bit base is first dequantized to its compute dtype
    (transformers' ``dequantize``): the weights the 4-bit forward computes with, once, rather than
    at every forward; the merge then rounds W + B @ A once in that dtype.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        # PEFT would fall back to a pickled adapter_model.bin; only safetensors are read here.
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors (only safetensors adapters are loaded)")
    if cfg.quantization == "auto":  # as training decided it on its device (plan.resolve_auto)
        cfg = dataclasses.replace(cfg, quantization=trained_quantization(adapter_dir))
    base = load_base_model(cfg, device=device, source=source)
    if merged and cfg.quantization == "nf4":
        base = base.dequantize(dtype=_quantization_config(cfg, device=device).bnb_4bit_compute_dtype)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False, use_safetensors=True)
    if merged:
        model = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse a merge that makes NaN/inf
    return model.eval()


def trained_quantization(adapter_dir: Path) -> str:
    """model.quantization the adapter in adapter_dir was trained with: its checkpoint's config.yaml
    (train records model.quantization=auto as decided there)."""
    import yaml

    recorded = Path(adapter_dir) / "config.yaml"
    value = (yaml.safe_load(recorded.read_text()) or {}).get("model", {}).get("quantization") if recorded.is_file() else None
    if value not in ("none", "nf4"):
        raise FileNotFoundError(f"{recorded}: model.quantization=auto needs the quantization training chose, "
                                f"recorded there; found {value!r}")
    return value
