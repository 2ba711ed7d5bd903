"""Export of the best adapter: stock PEFT files, and optionally the base with the adapter merged in.

``<run_dir>/export/`` is written as a whole (temp dir + rename), so a killed export never leaves a
directory that looks complete, and a failed one leaves an earlier complete export as it was:

* ``adapter/``: adapter_config.json + adapter_model.safetensors exactly as training saved them
  (copied byte for byte, so the export scores exactly as the pipeline did), peft's README.md,
  ``verbalizer.json`` (labels and their token ids) and the tokenizer, as the pipeline pads it.
* ``merged/`` (``export.merged``): the base reloaded unquantized on CPU with the adapter merged in,
  as sharded safetensors, with the tokenizer and ``verbalizer.json``. A 4-bit (QLoRA) base is
  never merged into 4-bit weights: rounding W + BA back to NF4 would throw most of the update away.
  Note that such a merge starts from the original full-precision weights, not the NF4 ones the
  adapter was trained against, so it scores close to, not exactly like, the trained model.
* ``export.json``: what was exported (see ``export_run``'s return value).

Main process only: nothing here is distributed.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rerank_dist.config import ExportConfig, ModelConfig, RunConfig
from rerank_dist.hardware import resolve_dtype
from rerank_dist.io import atomic_dir, read_json, sha256_file, write_json
from rerank_dist.modeling import _DTYPES, load_base_model, load_tokenizer, trained_quantization
from rerank_dist.paths import RunPaths

# What stock PEFT reads (and writes, with its model card); optimizer state and the run config stay behind.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OPTIONAL_ADAPTER_FILES = ("README.md",)
MANIFEST = "export.json"


def merged_dtype(model_cfg: ModelConfig, export_cfg: ExportConfig, trained: str | None = None) -> torch.dtype:
    """The dtype of the merged weights: export.dtype, or for auto the dtype the model computed in.

    trained: for model.dtype auto, the dtype training resolved it to (train_summary.json's ``dtype``);
    without it auto is resolved as training on this machine would (its GPU if any, else its CPU).
    auto with nf4: the 4-bit compute dtype (as modeling._quantization_config picks it), never 4-bit.
    """
    if export_cfg.dtype != "auto":
        return _DTYPES[export_cfg.dtype]
    model_dtype = model_cfg.dtype
    if model_dtype == "auto":
        model_dtype = trained or resolve_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")[0]
    if model_cfg.quantization == "nf4":
        return torch.bfloat16 if model_dtype == "bfloat16" else torch.float32
    return _DTYPES[model_dtype]


def export_run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    """Write <run_dir>/export/ from ranker/best/ (atomically) and return its manifest."""
    paths = RunPaths(Path(cfg.run_dir))
    best = paths.best
    if not (best / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{best / 'adapter_model.safetensors'}: no trained adapter to export; "
                                f"run the train stage first")
    if cfg.model.quantization == "auto":  # as training decided it on its device (the checkpoint's config.yaml)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization=trained_quantization(best)))
    verbalizer = read_json(best / "verbalizer.json")
    tokenizer = load_tokenizer(cfg.model)
    started = time.perf_counter()
    with atomic_dir(paths.export) as tmp:
        t0 = time.perf_counter()
        sha = _write_adapter(best, tmp / "adapter", tokenizer)
        log(f"[export] adapter (step {verbalizer.get('step')}) -> {paths.export / 'adapter'} "
            f"({time.perf_counter() - t0:.1f} s)")
        shards: list[str] = []
        dtype = merged_dtype(cfg.model, cfg.export, _trained_dtype(paths)) if cfg.export.merged else None
        if dtype is not None:
            t0 = time.perf_counter()
            shards = _write_merged(cfg, tmp / "adapter", tmp / "merged", tokenizer, dtype)
            log(f"[export] merged ({_dtype_name(dtype)}, {len(shards)} shard(s) of at most "
                f"{cfg.export.max_shard_size}) -> {paths.export / 'merged'} ({time.perf_counter() - t0:.1f} s)")
        manifest = _manifest(cfg, verbalizer, sha, dtype, shards)
        write_json(tmp / MANIFEST, manifest)
    log(f"[export] done in {time.perf_counter() - started:.1f} s: {paths.export}")
    return manifest


def _trained_dtype(paths: RunPaths) -> str | None:
    """The dtype the train stage resolved model.dtype to, where its summary records it."""
    summary = paths.ranker / "train_summary.json"
    return read_json(summary).get("dtype") if summary.is_file() else None


def _manifest(cfg: RunConfig, verbalizer: dict, sha: str, dtype: torch.dtype | None, shards: list[str]) -> dict:
    """What export.json records: enough to tell which training step and base the files came from."""
    return {
        "adapter_step": verbalizer.get("step"),
        "base_model": cfg.model.name_or_path,
        "trained_quantization": cfg.model.quantization,  # nf4: merged/ sits on the unquantized base
        "adapter_sha256": sha,
        "merged": dtype is not None,
        "merged_dtype": _dtype_name(dtype) if dtype is not None else None,
        "shards": shards,
        "max_shard_size": cfg.export.max_shard_size,
    }


def _write_adapter(best: Path, out: Path, tokenizer: Any) -> str:
    """Copy the adapter files (byte-exact, so scores match the pipeline's); return the weights' sha256."""
    out.mkdir()
    for name in ADAPTER_FILES + ("verbalizer.json",):
        shutil.copyfile(best / name, out / name)
    for name in OPTIONAL_ADAPTER_FILES:
        if (best / name).is_file():
            shutil.copyfile(best / name, out / name)
    _save_tokenizer(tokenizer, out)
    return sha256_file(out / "adapter_model.safetensors")


def _write_merged(cfg: RunConfig, adapter: Path, out: Path, tokenizer: Any, dtype: torch.dtype) -> list[str]:
    """Base (unquantized, dtype, CPU) + adapter merged, saved as safetensors shards; return the shard names."""
    from peft import PeftModel

    # eager: no forward pass runs here, and it is the one kernel every architecture has on CPU
    # (flash_attention_2 would need a GPU). The kernel is not written into the saved config.
    base_cfg = dataclasses.replace(cfg.model, quantization="none", dtype=_dtype_name(dtype),
                                   attn_implementation="eager")
    base = load_base_model(base_cfg, device="cpu")
    # safe_merge: check W + scale * B @ A for NaN/inf before it replaces W.
    merged = PeftModel.from_pretrained(base, adapter, is_trainable=False).merge_and_unload(safe_merge=True)
    # safe_serialization is transformers 4.x's switch (5.x writes only safetensors and ignores it).
    merged.save_pretrained(out, max_shard_size=cfg.export.max_shard_size, safe_serialization=True)
    _save_tokenizer(tokenizer, out)
    shutil.copyfile(adapter / "verbalizer.json", out / "verbalizer.json")
    return sorted(p.name for p in out.glob("*.safetensors"))


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    # save_pretrained writes init_kwargs, not the padding_side load_tokenizer set afterwards; record it
    # so the exported tokenizer pads on the left as the scorer does (the answer logit is read at -1).
    tokenizer.init_kwargs["padding_side"] = tokenizer.padding_side
    tokenizer.save_pretrained(out)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16", the config's spelling


