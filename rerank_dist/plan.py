"""The batch plan: how one optimizer step of ``train.batch_size`` examples is cut across processes.

The global batch is the invariant: it sets the numerics (how many examples one update averages), so
a recipe gives the same updates on 1 GPU or 16. ``train.micro_batch_size`` is a ceiling set by
memory. The rule, at world size W:

1. every process takes ``batch_size / W`` examples per step, so W must divide ``batch_size``;
2. the micro-batch is the largest divisor of that share that is at most ``micro_batch_size``;
3. accumulation is the share divided by the micro-batch.

So batch 16 with micro-batch 4 runs as 4 x 4 on one process, 4 x 2 on two, 4 x 1 on four, 2 x 1 on
eight and 1 x 1 on sixteen. The plan is computed, and a bad combination refused, before any stage
runs; no launcher setting may change it (``distributed.build_accelerator`` checks).

The world size comes from the launcher's environment (``WORLD_SIZE``, set by torchrun, ``rerank-dist
launch`` and ``accelerate launch``); this module reads it and never imports ``torch.distributed``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rerank_dist.config import ConfigError, RunConfig


@dataclass(frozen=True)
class BatchPlan:
    world_size: int        # processes taking part in one optimizer step
    batch_size: int        # examples per optimizer step, all processes together
    micro_batch_size: int  # examples per forward pass on one process
    accumulation: int      # forward passes per optimizer step on one process

    def describe(self) -> str:
        return (f"{self.batch_size} examples per step = {self.world_size} process(es) x micro-batch "
                f"{self.micro_batch_size} x {self.accumulation} accumulation")


def world_size_from_env() -> int:
    """Processes in this job as the launcher announced them (1 when started without a launcher)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE: expected a positive integer from the launcher, got {value!r}") from None
    if world < 1:
        raise ConfigError(f"WORLD_SIZE: expected a positive integer from the launcher, got {value!r}")
    return world


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batches(batch_size: int, micro_batch_ceiling: int, world_size: int) -> BatchPlan:
    """The plan for one optimizer step (see the module docstring), or a ConfigError naming a fix."""
    where = (f"train.batch_size={batch_size} with train.micro_batch_size={micro_batch_ceiling} "
             f"on {world_size} processes")
    if world_size > batch_size:
        raise ConfigError(f"{where}: every process needs at least one example per step; set "
                          f"train.batch_size={world_size} (or a multiple) or use at most {batch_size} processes")
    if batch_size % world_size:
        lower, upper = (batch_size // world_size) * world_size, (batch_size // world_size + 1) * world_size
        fits = ", ".join(str(d) for d in _divisors(batch_size))
        raise ConfigError(f"{where}: {batch_size} examples cannot be split evenly over {world_size} processes; set "
                          f"train.batch_size={lower} or {upper}, or use {fits} processes")
    share = batch_size // world_size
    micro = max(d for d in _divisors(share) if d <= micro_batch_ceiling)
    return BatchPlan(world_size=world_size, batch_size=batch_size, micro_batch_size=micro,
                     accumulation=share // micro)


def plan_for(cfg: RunConfig, world_size: int | None = None) -> BatchPlan:
    """The plan at world_size processes (default: the launcher's), refusing a launcher that would change it."""
    world = world_size_from_env() if world_size is None else world_size
    plan = plan_batches(cfg.train.batch_size, cfg.train.micro_batch_size, world)
    # accelerate lets this variable (written by `accelerate launch` from an accelerate config's
    # gradient_accumulation_steps) override the accumulation the code asks for.
    launcher = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "")
    if launcher not in ("", "auto", str(plan.accumulation)):
        raise ConfigError(f"the launcher sets gradient accumulation to {launcher} (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, "
                          f"from gradient_accumulation_steps in an accelerate config) but the batch plan needs "
                          f"{plan.accumulation} ({plan.describe()}); remove it there: train.batch_size decides")
    return plan


def plan_problems(cfg: RunConfig, world_size: int | None = None) -> list[str]:
    """The batch plan's objection to cfg at world_size processes (default: the launcher's), as one line
    each; empty when it has none. settings.load_config reports it with the config's own problems, so a
    bad combination fails before any stage."""
    if cfg.train.batch_size <= 0 or cfg.train.micro_batch_size <= 0:
        return []  # config.validate reports those; there is no plan to check
    try:
        plan_for(cfg, world_size)
    except ConfigError as e:
        return [str(e)]
    return []


# ---------------------------------------------------------------- model.gradient_checkpointing / quantization auto

# A run is taken to fit when the estimate is at most this share of the device's memory: the estimate
# is a model (memory.py), and the allocator's fragmentation comes on top of it.
AUTO_HEADROOM = 0.9


def resolve_auto(cfg: RunConfig, plan: BatchPlan, device_bytes: int, device: str = "cuda",
                 decided: dict | None = None) -> tuple[Any, dict]:
    """model.gradient_checkpointing / model.quantization with auto decided for a device of
    ``device_bytes``: (the ModelConfig with concrete values, a record of the choice and its reason).

    ``decided``: the concrete values a run being resumed recorded (its checkpoint's config.yaml,
    ``recorded_memory_options``). They are kept whatever this device would choose: a run that
    started in 4-bit must not go on in 16-bit (or the reverse) because it restarted elsewhere.

    The fastest setting whose training-memory estimate fits is taken, in this order: neither, checkpointing
    alone, 4-bit alone, both (checkpointing costs about a third more compute; bitsandbytes' 4-bit
    matmuls run at about 0.6x of 16-bit ones, so 4-bit comes after it). Only the fields set to auto
    vary. With no estimate (no config.json offline) or nothing that fits, the last (least memory) is taken.
    """
    import dataclasses

    from rerank_dist.hardware import resolve_dtype
    from rerank_dist.memory import GIB, estimate_training_memory, find_architecture

    mc = cfg.model
    asked = {"gradient_checkpointing": mc.gradient_checkpointing, "quantization": mc.quantization}
    ckpt = ["false", "true"] if mc.gradient_checkpointing == "auto" else [
        "true" if mc.gradient_checkpointing in (True, "true") else "false"]
    quant = ["none", "nf4"] if mc.quantization == "auto" else [mc.quantization]
    options = [(q, c) for q in quant for c in ckpt]
    record: dict[str, Any] = {"asked": asked, "device_gib": round(device_bytes / GIB, 1), "headroom": AUTO_HEADROOM}
    if "auto" not in asked.values():
        return mc, {**record, "gradient_checkpointing": ckpt[0], "quantization": quant[0], "reason": "set in the config"}
    if decided is not None:
        q = decided["quantization"] if mc.quantization == "auto" else quant[0]
        c = decided["gradient_checkpointing"] if mc.gradient_checkpointing == "auto" else ckpt[0]
        record.update({"gradient_checkpointing": c, "quantization": q,
                       "reason": f"as the run decided before its restart ({decided['source']}), not re-estimated"})
        return dataclasses.replace(mc, quantization=q, gradient_checkpointing=c), record
    found = find_architecture(mc.name_or_path, mc.cache_dir)
    chosen, reason, estimates = options[-1], "", {}
    if found is None:
        reason = f"no config.json for {mc.name_or_path} offline, so no memory estimate: the least-memory setting"
    else:
        arch, _ = found
        dtype = resolve_dtype(mc.dtype, device)[0]
        budget = AUTO_HEADROOM * device_bytes
        for q, c in options:
            trial = dataclasses.replace(mc, dtype=dtype, quantization=q, gradient_checkpointing=c)
            total = estimate_training_memory(arch, trial, plan.micro_batch_size, cfg.prompt.max_prompt_tokens,
                                             plan.world_size, mixed_precision=cfg.train.mixed_precision,
                                             backend=cfg.train.backend)["total"]
            estimates[f"quantization={q}, gradient_checkpointing={c}"] = round(total / GIB, 2)
            if total <= budget:
                chosen = (q, c)
                reason = (f"estimate {total / GIB:.1f} GiB fits {AUTO_HEADROOM:.0%} of the device's "
                          f"{device_bytes / GIB:.1f} GiB")
                break
        else:
            reason = (f"no setting fits {AUTO_HEADROOM:.0%} of the device's {device_bytes / GIB:.1f} GiB by the "
                      f"estimate: the least-memory one")
    q, c = chosen
    record.update({"gradient_checkpointing": c, "quantization": q, "reason": reason,
                   "estimates_gib": estimates, "micro_batch": plan.micro_batch_size,
                   "seq_len": cfg.prompt.max_prompt_tokens})
    return dataclasses.replace(mc, quantization=q, gradient_checkpointing=c), record


def recorded_memory_options(step_dir: Path) -> dict | None:
    """The concrete model.quantization / gradient_checkpointing a checkpoint's config.yaml records
    (train writes auto as decided), with where they were read; None if it records no concrete pair."""
    import yaml

    recorded = Path(step_dir) / "config.yaml"
    model = (yaml.safe_load(recorded.read_text()) or {}).get("model", {}) if recorded.is_file() else {}
    q, c = model.get("quantization"), model.get("gradient_checkpointing")
    c = {True: "true", False: "false"}.get(c, c)  # YAML may read true / false as booleans
    if q not in ("none", "nf4") or c not in ("true", "false"):
        return None
    return {"quantization": q, "gradient_checkpointing": c, "source": f"{Path(step_dir).name}/config.yaml"}


# ---------------------------------------------------------------- the dry run


def _training_examples(cfg: RunConfig) -> tuple[int | None, str]:
    """How many training examples the train stage will see, and how that was found (no weights read).

    The training candidates file when it is there and has one row per example; otherwise (no file,
    e.g. retriever.train_candidates=none, or every prefix asked for) counted from the prepared
    sequences, one example per training prefix (``data.splits.train_prefix_lens``).
    """
    from rerank_dist.paths import RunPaths

    paths = RunPaths(Path(cfg.run_dir))
    cap = cfg.prompt.max_train_examples
    count = cfg.retriever.train_prefixes_per_user
    candidates = paths.candidates("train")
    if count > 0 and cfg.retriever.train_candidates != "none" and candidates.is_file():
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(candidates).metadata.num_rows
        return (min(rows, cap) if cap else rows), f"{rows} training prefixes in {candidates}"
    if (paths.data / "meta.json").is_file():
        from rerank_dist.data.prepare import load_dataset
        from rerank_dist.data.splits import train_prefix_lens

        sequences = load_dataset(paths.data).sequences
        rows = sum(len(train_prefix_lens(len(seq), count)) for seq in sequences.values())
        per_user = "every prefix" if count == 0 else f"up to {count} prefixes"
        return (min(rows, cap) if cap else rows), f"{rows} training prefixes ({len(sequences)} users x {per_user})"
    if cap:
        return cap, "prompt.max_train_examples (at most; the data is not prepared yet)"
    return None, "unknown until the prepare stage has run"


def dry_run_lines(cfg: RunConfig, plan: BatchPlan, nodes: int = 1, cpu: bool | None = None) -> list[str]:
    """What a training run would do, read from the config, the launcher's environment and the model's
    config.json alone: no weights are loaded and nothing is written. cpu: whether the processes would
    run on CPUs (default: no GPU visible, or ACCELERATE_USE_CPU set)."""
    import dataclasses

    import torch

    from rerank_dist.hardware import resolve_dtype
    from rerank_dist.memory import (BACKEND_NAMES, BACKENDS, GIB, MEASURED_BACKENDS, estimate_scoring_weights,
                                    estimate_training_memory, find_architecture)

    tc, mc = cfg.train, cfg.model
    if cpu is None:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true", "yes"}
    gpu = torch.cuda.is_available() and not cpu
    auto_lines = []
    if "auto" in (mc.gradient_checkpointing, mc.quantization):
        from rerank_dist.hardware import device_memory_bytes

        mc, choice = resolve_auto(cfg, plan, device_memory_bytes("cuda" if gpu else "cpu"), "cuda" if gpu else "cpu")
        auto_lines.append(f"auto: quantization {choice['quantization']}, gradient checkpointing "
                          f"{choice['gradient_checkpointing']} on this device ({choice['reason']})")
    device = f"cuda ({torch.cuda.get_device_name(0)})" if gpu else "cpu"
    # DeepSpeed and FSDP set up their process group even for one process; plain DDP does not.
    backend = ("single process" if plan.world_size == 1 and tc.backend == "ddp"
               else f"{BACKEND_NAMES[tc.backend]} over {'nccl' if gpu else 'gloo'}")
    examples, source = _training_examples(cfg)
    lines = [
        f"world: {plan.world_size} process(es) on {nodes} node(s), {device}; backend {backend}",
        f"batch: {plan.describe()}",
    ]
    if examples is not None:
        steps_per_epoch = math.ceil(examples / plan.batch_size)
        total = tc.epochs * steps_per_epoch
        total = min(total, tc.max_steps) if tc.max_steps else total
        lines.append(f"steps: {total} optimizer steps ({examples} examples, {source}; {tc.epochs} epoch(s)"
                     f"{f', max_steps {tc.max_steps}' if tc.max_steps else ''})")
    else:
        lines.append(f"steps: {source}")
    # Under DeepSpeed, train.mixed_precision is DeepSpeed's own 16-bit mode (accelerate runs no autocast).
    mixed = (f"DeepSpeed {tc.mixed_precision} mode" if tc.backend in {"zero2", "zero3"} and tc.mixed_precision != "no"
             else f"autocast {tc.mixed_precision}")
    # model.dtype auto as the processes would resolve it, on this machine's GPU or CPU.
    dtype, dtype_reason = resolve_dtype(mc.dtype, "cuda" if gpu else "cpu")
    weights = f"{dtype} ({dtype_reason})" if mc.dtype == "auto" else dtype
    lines += auto_lines
    lines.append(f"precision: weights {weights}, quantization {mc.quantization}, {mixed}; "
                 f"LoRA r={mc.lora_r} on {','.join(mc.lora_target_modules)}"
                 + (f" (last {mc.lora_layers} layers)" if mc.lora_layers else ""))
    mc = dataclasses.replace(mc, dtype=dtype)  # the memory estimate counts the resolved dtype
    found = find_architecture(mc.name_or_path, mc.cache_dir)
    if found is None:
        lines.append(f"memory: unknown (no config.json for {mc.name_or_path} offline)")
    else:
        arch, where = found
        estimates = {b: estimate_training_memory(arch, mc, plan.micro_batch_size, cfg.prompt.max_prompt_tokens,
                                                 plan.world_size, mixed_precision=tc.mixed_precision, backend=b)
                     for b in BACKENDS}
        # Only the DDP estimate has been checked against a GPU; the others are a model, and say so.
        unmeasured = ("" if tc.backend in MEASURED_BACKENDS
                      else "; unmeasured: modelled from the library sources, no GPU run checked it")
        lines.append(f"memory: {estimates[tc.backend]['summary']} (architecture from {where}{unmeasured})")
        # The same run under each backend, so one can be chosen before renting devices.
        lines.append(f"memory by backend at {plan.world_size} process(es), GiB per device "
                     f"(weights: base model kept; gathered: held whole while computed; "
                     f"unmeasured: no GPU run checked that estimate):")
        for b, e in estimates.items():
            lines.append(f"  {b:<5} {BACKEND_NAMES[b]:<16} total {e['total'] / GIB:5.1f}  "
                         f"weights {e['weights'] / GIB:5.1f}  gathered {e['gathered_working_set'] / GIB:4.1f}  "
                         f"activations {e['activations'] / GIB:5.1f}"
                         f"{'' if b in MEASURED_BACKENDS else '  unmeasured'}"
                         f"{'  <- train.backend' if b == tc.backend else ''}")
        held = estimate_scoring_weights(arch, mc)
        ways = {"base_and_adapter": f"base ({mc.quantization}) + adapter", "merged": f"merged, {held['dtype']}"}
        chosen = "merged" if cfg.score.merged_weights else "base_and_adapter"
        lines.append("scoring weights per process, GiB (score.merged_weights): " + ", ".join(
            f"{ways[k]} {held[k] / GIB:.1f}{' <- this run' if k == chosen else ''}" for k in ways))
    every = [f"every {tc.save_every} steps" if tc.save_every else "",
             f"every {tc.save_every_minutes:g} min" if tc.save_every_minutes else ""]
    lines.append(f"checkpoints: {' and '.join(e for e in every if e) or 'at the end only'}, "
                 f"keeping the last {tc.keep_last or 'all'} and the best")
    return lines
