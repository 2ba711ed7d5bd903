"""What ``model.dtype: auto`` means on the device a model is loaded on, and why.

One rule, used by every reader of ``model.dtype`` (modeling, export, memory, plan, score, the
doctor's probe) so they all agree on the concrete dtype:

* CUDA: bfloat16 where the GPU computes it natively (compute capability 8.0+, or ROCm), else
  float32. Not float16: fp16 activations overflow in this project's scoring (score.py refuses
  non-finite scores and names bf16 / fp32 as the fix) and the training loop has no loss scaling
  for a 16-bit model, so fp16 is left to an explicit ``model.dtype=float16``.
* CPU: bfloat16 only where the CPU computes it natively (AVX512-BF16 or AMX, as torch's own probes
  report), else float32: on an AVX2-only CPU bf16 is emulated, and one SmolLM2-135M training
  example took ~110 s in bf16 against ~3.6 s in float32.
* Any other device type: float32 (no probe for it here).

torch is imported inside the functions: ``memory`` and ``plan`` use this module for ``--dry-run``,
which must stay fast.
"""

from __future__ import annotations

from typing import Any

DTYPES = ("auto", "bfloat16", "float32", "float16")  # model.dtype's choices
# What --dry-run's memory estimate assumes for auto: the GPUs the GPU recipes are sized for
# (A100 / H100 / H200) all compute bf16 natively. Stated in the estimate's summary.
PLANNED_GPU_DTYPE = "bfloat16"


def resolve_dtype(cfg_dtype: str, device: Any = None) -> tuple[str, str]:
    """(concrete dtype name, one-line reason) for model.dtype=cfg_dtype on device (default: CPU).

    An explicit dtype passes through unchanged; auto follows the rules in the module docstring.
    """
    if cfg_dtype != "auto":
        return cfg_dtype, f"model.dtype={cfg_dtype} set explicitly"
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return _cuda_dtype(dev)
    if dev.type == "cpu":
        return _cpu_dtype()
    return "float32", f"{dev.type}: no native-bfloat16 probe for this device type: float32"


def planned_dtype(cfg_dtype: str) -> tuple[str, str]:
    """resolve_dtype for a GPU that is not here (the memory estimate): auto is taken as bf16-capable."""
    if cfg_dtype != "auto":
        return resolve_dtype(cfg_dtype)
    return PLANNED_GPU_DTYPE, f"model.dtype auto taken as {PLANNED_GPU_DTYPE}, assuming a bf16-capable GPU"


def _cuda_bf16_native(dev: Any) -> bool:
    """Whether the GPU dev (the current one where dev has no index) computes bfloat16 natively."""
    import contextlib

    import torch

    # torch.cuda.is_bf16_supported asks about the current device; dev's own where it names one.
    where = torch.cuda.device(dev) if dev.index is not None else contextlib.nullcontext()
    with where:
        try:
            # including_emulation=False: a pre-Ampere GPU "supports" bf16 only by emulation, slowly.
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # an older torch without the including_emulation argument
            return bool(torch.cuda.is_bf16_supported())


def _cuda_dtype(dev: Any) -> tuple[str, str]:
    name = _cuda_name(dev)
    if _cuda_bf16_native(dev):
        return "bfloat16", f"CUDA {name} with native bfloat16: bfloat16"
    # float16 would be as fast, but its activations overflow in scoring (non-finite scores): see the module docstring.
    return "float32", f"CUDA {name} without native bfloat16 (float16 overflows in scoring): float32"


def _cuda_name(dev: Any) -> str:
    import torch

    try:
        major, minor = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)} (sm_{major}{minor})"
    except Exception:  # noqa: BLE001 - the name only decorates the reason
        return str(dev)


def _probe(name: str) -> bool | None:
    """torch.cpu's private capability probe `name` (None where this torch lacks it)."""
    import torch

    fn = getattr(torch.cpu, name, None)
    if fn is None:
        return None
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - a broken probe counts as "not known to be there"
        return None


def _cpu_dtype() -> tuple[str, str]:
    import torch

    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    capability = get() if get is not None else "unknown ISA"
    amx = _probe("_is_amx_tile_supported")
    avx512_bf16 = _probe("_is_avx512_bf16_supported")
    if amx:
        return "bfloat16", f"CPU {capability} with AMX: native bfloat16"
    if avx512_bf16:
        return "bfloat16", f"CPU {capability} with AVX512-BF16: native bfloat16"
    missing = " (torch has no bf16 probe)" if amx is None and avx512_bf16 is None else ""
    return "float32", f"CPU {capability} without native bfloat16{missing} (bf16 would be ~30x slower): float32"


def device_memory_bytes(device: Any = None) -> int:
    """Memory the device offers a process: a GPU's total memory, a CPU's RAM (default: CPU)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)
