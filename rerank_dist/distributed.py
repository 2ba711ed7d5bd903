"""The one module that builds the Accelerator and owns the training state on disk.

Starting the processes is ``launcher.py`` (torchrun underneath); the training loop and the scorer
call in here for the Accelerator and for checkpoints. Everything else (data, prompts, modeling,
metrics) stays free of distributed code.

The Accelerator is built from the config alone, so one run gives the same numerics with or without
a launcher: gradient accumulation comes from the batch plan (``plan.py``) and mixed precision from
``train.mixed_precision``; a launcher that tries to set either differently is refused or overruled,
never silently obeyed.

Checkpoints go through ``accelerator.save_state`` / ``load_state``: every process writes its own RNG
state, the optimizer state comes from whoever holds it, and a hook stores the model as its LoRA
adapter only (safetensors, PEFT format) instead of the whole frozen base.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import GradientAccumulationPlugin, parse_flag_from_env

from rerank_dist.config import ConfigError, RunConfig
from rerank_dist.io import publish_dir
from rerank_dist.plan import BatchPlan

log = logging.getLogger(__name__)

_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def build_accelerator(cfg: RunConfig, plan: BatchPlan | None = None, trackers_dir: Path | None = None,
                      say: Callable[[str], None] = print) -> Accelerator:
    """The Accelerator for training (plan given, from plan.plan_for, which has already refused a launcher
    that sets another accumulation) or scoring (no plan)."""
    mixed = cfg.train.mixed_precision
    env_mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if env_mixed and env_mixed != mixed:
        say(f"note: the launcher asks for mixed precision {env_mixed!r}; train.mixed_precision={mixed!r} is used")
    if mixed == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    trackers = [t for t in cfg.train.report_to if t != "none"]
    accelerator = Accelerator(
        mixed_precision=mixed,
        # A plugin object, not gradient_accumulation_steps=: accelerate lets an environment variable
        # override the plain argument, and the plan must not change behind the config's back.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=plan.accumulation if plan else 1),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=trackers or None,
        project_dir=str(trackers_dir) if trackers_dir is not None else None,
    )
    if plan is not None:
        if accelerator.num_processes != plan.world_size:
            raise RuntimeError(f"the batch plan was made for {plan.world_size} processes (WORLD_SIZE) but the "
                               f"Accelerator sees {accelerator.num_processes}; start the job with rerank-dist launch")
        if accelerator.gradient_accumulation_steps != plan.accumulation:
            raise ConfigError(f"the launcher's backend config sets gradient accumulation to "
                              f"{accelerator.gradient_accumulation_steps}, the batch plan needs {plan.accumulation} "
                              f"({plan.describe()}); set it to 'auto' or remove it")
    return accelerator


def process_state() -> PartialState:
    """This process's place in the job (rank, world, barriers), before or without an Accelerator.

    Built as the Accelerator builds it: a plain PartialState() ignores ACCELERATE_USE_CPU and, being
    a singleton, would then pin every later Accelerator of a torchrun CPU job to a world of one.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def describe(accelerator: Accelerator) -> str:
    """One line: how many processes, which backend, which device; printed at the start of a run."""
    state = accelerator.state
    backend = getattr(state, "backend", None) or "none"
    return (f"process {accelerator.process_index} of {accelerator.num_processes} "
            f"({state.distributed_type.value}, backend {backend}, device {accelerator.device}, "
            f"mixed precision {accelerator.mixed_precision})")


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory this process allocated on its accelerator so far (None on CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


# ---------------------------------------------------------------- checkpoints


def keep_adapter_only(accelerator: Accelerator) -> None:
    """Make save_state / load_state store each model as its PEFT adapter (safetensors) alone.

    Without the hooks accelerate would write the whole state dict, frozen base included: a copy of
    a 7B model in every checkpoint.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    def save(models: list[Any], weights: list[dict], output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(output_dir, safe_serialization=True)
        weights.clear()  # nothing left for accelerate to save as model.safetensors

    def load(models: list[Any], input_dir: str) -> None:
        path = Path(input_dir) / _ADAPTER_WEIGHTS
        while models:
            model = accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, load_file(path))
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"{path}: keys the model does not have: {result.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator: Accelerator, step_dir: Path, write_extras: Callable[[Path], None]) -> None:
    """Every process's share of the training state into step_dir, which appears only once complete.

    All processes write into one temporary directory (its name is fixed, so they agree on it
    without talking), the main process adds write_extras(tmp), then renames it into place.
    The run directory must be on a filesystem every node sees.
    """
    tmp = step_dir.with_name(f".{step_dir.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_extras(tmp)
        publish_dir(tmp, step_dir)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, step_dir: Path, saved_world_size: int) -> bool:
    """Restore adapter, optimizer and this process's RNG states from step_dir.

    Returns whether the RNG streams continue exactly: a checkpoint written by another number of
    processes has no RNG state for some ranks (accelerate then keeps the current ones).
    """
    if not (step_dir / _ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{step_dir}: no {_ADAPTER_WEIGHTS}; the checkpoint is incomplete")
    accelerator.load_state(str(step_dir))
    return saved_world_size == accelerator.num_processes and \
        (step_dir / f"random_states_{accelerator.process_index}.pkl").is_file()
