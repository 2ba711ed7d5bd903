"""The one module that builds the Accelerator and owns the training state on disk.

Starting the processes is ``launcher.py`` (torchrun underneath); the training loop and the scorer
call in here for the Accelerator and for checkpoints, the retrieve stage for its share of the
candidate batches (``ProcessShares``). Everything else (data, prompts, modeling, metrics) stays
free of distributed code.

The Accelerator is built from the config alone, so one run gives the same numerics with or without
a launcher: gradient accumulation comes from the batch plan (``plan.py``) and mixed precision from
``train.mixed_precision``; a launcher that tries to set either differently is refused or overruled,
never silently obeyed.

The backend (``train.backend``) is part of the config too: ``ddp``, DeepSpeed ``zero2`` / ``zero3``
or PyTorch ``fsdp`` (FSDP2), each built here as an Accelerate plugin, so the training loop is the
same code under all four. On CPUs DeepSpeed runs over gloo (``DS_ACCELERATOR=cpu``).

Checkpoints go through ``accelerator.save_state`` / ``load_state`` (DDP, DeepSpeed) or
torch.distributed.checkpoint (FSDP): every process writes its own RNG state and its share of the
optimizer state, the frozen base is never written, and the LoRA adapter is gathered whole into
``adapter_model.safetensors`` (PEFT format) whatever the backend, so ``best/`` and ``export/`` are
the same files under all four.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import (DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs,
                              broadcast_object_list, gather_object, parse_flag_from_env)

from rerank_dist.config import SHARDED_BACKENDS, ConfigError, RunConfig
from rerank_dist.extras import require
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
    # Scoring (no plan) is plain data parallel whatever the training backend: inference needs no
    # optimizer state, and each process holding the model answers its share of prompts fastest.
    backend = cfg.train.backend if plan is not None else "ddp"
    if plan is not None:
        _check_launcher_backend(backend)
        process_state(backend)  # under DeepSpeed: its process group, unless the stage started it already
    accelerator = Accelerator(
        mixed_precision=mixed,
        # A plugin object, not gradient_accumulation_steps=: accelerate lets an environment variable
        # override the plain argument, and the plan must not change behind the config's back.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=plan.accumulation if plan else 1),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=trackers or None,
        project_dir=str(trackers_dir) if trackers_dir is not None else None,
        **_backend_plugins(cfg, plan, backend),
    )
    if backend != "ddp" and accelerator.distributed_type != _DISTRIBUTED_TYPES[backend]:
        raise ConfigError(
            f"train.backend={backend} needs GPUs (accelerate runs {BACKEND_NAMES[backend]} on accelerators only"
            f"{', and DeepSpeed on CPUs only with DS_ACCELERATOR=cpu' if backend.startswith('zero') else ''}); "
            f"this process got {accelerator.distributed_type.value} on {accelerator.device}")
    if plan is not None:
        if accelerator.num_processes != plan.world_size:
            raise RuntimeError(f"the batch plan was made for {plan.world_size} processes (WORLD_SIZE) but the "
                               f"Accelerator sees {accelerator.num_processes}; start the job with rerank-dist launch")
        if accelerator.gradient_accumulation_steps != plan.accumulation:
            raise ConfigError(f"the launcher's backend config sets gradient accumulation to "
                              f"{accelerator.gradient_accumulation_steps}, the batch plan needs {plan.accumulation} "
                              f"({plan.describe()}); set it to 'auto' or remove it")
    return accelerator


BACKEND_NAMES = {"ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP2"}
_DISTRIBUTED_TYPES = {"zero2": DistributedType.DEEPSPEED, "zero3": DistributedType.DEEPSPEED,
                      "fsdp": DistributedType.FSDP}
# DeepSpeed sizes, in elements. Buckets of 5e7 bound the communication buffers (a bf16 bucket is
# 100 MB) far below DeepSpeed's 5e8 defaults, which are sized for full fine-tuning rather than LoRA.
DEEPSPEED_BUCKET = 50_000_000
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # parameters smaller than this (norms, LoRA B of small layers) stay whole
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000


def deepspeed_config(cfg: RunConfig, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed config of a zero2 / zero3 run, from the run config and its batch plan alone.

    Every value is explicit rather than DeepSpeed's "auto", so the config a run used can be read
    off its own config.yaml. Gradient clipping is DeepSpeed's (train.max_grad_norm; 0 = none);
    mixed precision is DeepSpeed's bf16/fp16 mode (the LoRA weights train in 16-bit with fp32
    master copies in the optimizer), rather than autocast as under ddp and fsdp.
    """
    tc = cfg.train
    zero: dict[str, Any] = {"stage": 3 if tc.backend == "zero3" else 2, "overlap_comm": False,
                            "contiguous_gradients": True, "reduce_bucket_size": DEEPSPEED_BUCKET,
                            "allgather_bucket_size": DEEPSPEED_BUCKET}
    if tc.backend == "zero3":
        zero.update({"stage3_prefetch_bucket_size": DEEPSPEED_BUCKET,
                     "stage3_param_persistence_threshold": ZERO3_PERSISTENCE_THRESHOLD,
                     "stage3_max_live_parameters": ZERO3_MAX_LIVE_PARAMETERS,
                     "stage3_max_reuse_distance": ZERO3_MAX_LIVE_PARAMETERS,
                     # The adapter is gathered on its own (adapter_state_dict); a 16-bit copy of the
                     # whole model at every save would cost minutes and the main process's memory.
                     "stage3_gather_16bit_weights_on_model_save": False})
    built = {
        "train_batch_size": plan.batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": float(tc.max_grad_norm),
        "bf16": {"enabled": tc.mixed_precision == "bf16"},
        "fp16": {"enabled": tc.mixed_precision == "fp16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW on the LoRA weights, as under ddp
        "wall_clock_breakdown": False,
    }
    if not tc.deepspeed_config:
        return built
    return _with_user_overrides(built, Path(tc.deepspeed_config))


_PLAN_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _with_user_overrides(built: dict[str, Any], path: Path) -> dict[str, Any]:
    """built, with the values of the user's DeepSpeed file laid over it key by key."""
    import yaml  # JSON is YAML too

    from rerank_dist.config import _merged

    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid JSON/YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: expected a mapping of DeepSpeed settings")
    clashes = [k for k in _PLAN_KEYS if k in user and user[k] != built[k]]
    if clashes:
        raise ConfigError(f"{path}: {', '.join(f'{k}={user[k]}' for k in clashes)} contradicts the batch plan "
                          f"({', '.join(f'{k}={built[k]}' for k in clashes)}); set train.batch_size / "
                          f"train.micro_batch_size instead, or remove them")
    return _merged(built, user)


def _backend_plugins(cfg: RunConfig, plan: BatchPlan | None, backend: str) -> dict[str, Any]:
    """Accelerator keyword arguments that select the backend."""
    cpu = not torch.cuda.is_available()
    if backend in ("zero2", "zero3"):
        from accelerate.utils import DeepSpeedPlugin

        assert plan is not None
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, plan), zero_stage=3 if backend == "zero3" else 2,
                                 gradient_accumulation_steps=plan.accumulation,
                                 gradient_clipping=float(cfg.train.max_grad_norm),
                                 zero3_init_flag=backend == "zero3", zero3_save_16bit_model=False)
        kwargs: dict[str, Any] = {"deepspeed_plugin": plugin}
        if cpu:
            # Accelerate finds no backend of its own on CPUs when DeepSpeed starts the process group
            # (each process would see a world of one); gloo, named here, is what DeepSpeed's CPU
            # accelerator uses.
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        return kwargs
    if backend == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        mixed = cfg.train.mixed_precision
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            # One shard group per decoder layer (the model's _no_split_modules), gathered for its own
            # forward and backward and freed after, so at most about two layers are whole at a time.
            auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT",
            # Only the main process reads the weights; the others start on the meta device and
            # receive their shards from it, so host memory holds one copy of the model per node.
            cpu_ram_efficient_loading=True,
            sync_module_states=True,
            mixed_precision_policy=mixed if mixed != "no" else None,
        )
        return {"fsdp_plugin": plugin}
    return {}


def _check_launcher_backend(backend: str) -> None:
    """A launcher config (accelerate launch --config_file) that selects another backend is refused:
    the run config's train.backend decides, and a silent switch would change memory and checkpoints."""
    launched = ("zero" + os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
                if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") else
                "fsdp" if parse_flag_from_env("ACCELERATE_USE_FSDP") else None)
    if launched is not None and launched != backend:
        raise ConfigError(f"the launcher's config selects {launched} but train.backend={backend}; "
                          f"set train.backend={launched} or launch with the matching config")


def weights_held(model: Any) -> tuple[int, int]:
    """(weight elements stored on this process, elements of the whole model): how much of the model
    this process really holds once the backend has placed it. A ZeRO-3 parameter counts its
    partition, an FSDP2 DTensor its local shard, a meta tensor nothing."""
    from torch.distributed.tensor import DTensor

    held = whole = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            held, whole = held + p.ds_tensor.numel(), whole + p.ds_numel
        elif isinstance(p, DTensor):
            held, whole = held + p.to_local().numel(), whole + p.numel()
        else:
            held, whole = held + (0 if p.is_meta else p.numel()), whole + p.numel()
    return held, whole


def shards_weights(cfg: RunConfig) -> bool:
    """Whether training cuts the base weights across processes (load without a device, see modeling)."""
    return cfg.train.backend in SHARDED_BACKENDS


def process_state(backend: str = "ddp") -> PartialState:
    """This process's place in the job (rank, world, barriers), before or without an Accelerator.

    Built as the Accelerator builds it: a plain PartialState() ignores ACCELERATE_USE_CPU and, being
    a singleton, would then pin every later Accelerator of a torchrun CPU job to a world of one.
    backend: the training backend of the stage about to run (ddp for stages that do not train).
    Under DeepSpeed the process group is DeepSpeed's own (deepspeed.comm), started here; on CPUs
    over gloo with DeepSpeed's CPU accelerator, and without ACCELERATE_USE_CPU, which would make
    accelerate set the DeepSpeed plugin aside and run plain DDP.
    """
    if backend in ("zero2", "zero3"):
        require("deepspeed", "deepspeed", f"train.backend={backend}")
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    if backend not in ("zero2", "zero3") or PartialState._shared_state:
        return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    _check_launcher_backend(backend)
    if "LOCAL_RANK" not in os.environ:
        raise ConfigError(f"train.backend={backend} runs under a launcher: rerank-dist launch --nproc-per-node N "
                          f"(N may be 1) or accelerate launch")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = backend[-1]
    if not cpu:
        return PartialState()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.pop("ACCELERATE_USE_CPU", None)
    return PartialState(backend="gloo")


class ProcessShares:
    """Every process of the job sharing a stage's work (the retrieve stage's ``Workers``).

    Built at the same point on every process (it makes a process group, a collective). The stage
    passes in the list of work units (batch start indices); each process computes a contiguous share
    (``split_between_processes``) and the main process receives them in process order
    (``gather_object``), so joining them restores the list's order.
    """

    # The others wait at a barrier while the main process trains the retriever: longer than a default
    # process-group timeout (10 min for NCCL) may allow, so the wait has a group of its own.
    PATIENCE = datetime.timedelta(hours=24)

    def __init__(self, state: PartialState):
        self.state = state
        self.is_main_process = state.is_main_process
        self.num_processes = state.num_processes
        self._patient = None
        if state.num_processes > 1:
            import torch.distributed as dist

            self._patient = dist.new_group(backend="gloo", timeout=self.PATIENCE)

    def wait_for_everyone(self) -> None:
        if self._patient is not None:
            import torch.distributed as dist

            dist.barrier(group=self._patient)

    def gather_shares(self, work: list, compute: Callable[[list], Any]) -> list:
        with self.state.split_between_processes(list(work)) as mine:
            share = compute(list(mine))
        shares = gather_object([share])  # [share of process 0, share of process 1, ...] on every process
        return list(shares) if self.is_main_process else []


def main_decides(state: PartialState, value: Any) -> Any:
    """The main process's value on every process: processes that must take the same branch around a
    collective (skip a stage or run it) follow one decision, not each its own reading of the disk."""
    if state.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def agreed(accelerator: Accelerator, flags: list[bool]) -> list[bool]:
    """Decisions that depend on each process's clock or signals, made the same on every process (any
    one says yes): a process that stopped or saved alone would leave the others waiting in a collective."""
    votes = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [v > 0 for v in accelerator.reduce(votes, "max").tolist()]


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
    """Make save_state / load_state leave the model to save_checkpoint / load_checkpoint.

    Without the hooks accelerate would write the whole state dict, frozen base included: a copy of
    a 7B model in every checkpoint. The adapter is written by save_adapter instead, gathered whole
    under every backend; under DeepSpeed the engine's own checkpoint restores it (with the optimizer
    partitions), elsewhere the load hook reads it back.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    def save(models: list[Any], weights: list[dict], output_dir: str) -> None:
        weights.clear()  # nothing left for accelerate to save as model.safetensors

    def load(models: list[Any], input_dir: str) -> None:
        path = Path(input_dir) / _ADAPTER_WEIGHTS
        while models:
            model = accelerator.unwrap_model(models.pop())
            if accelerator.distributed_type == DistributedType.DEEPSPEED:
                continue  # restored by engine.load_checkpoint, partitioned as the engine holds it
            result = set_peft_model_state_dict(model, load_file(path))
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"{path}: keys the model does not have: {result.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def adapter_state_dict(accelerator: Accelerator, model: Any) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights, whole and on the CPU, keyed as in model.state_dict(); on the
    main process (other processes get an empty dict). Every process must call it: under ZeRO-3 and
    FSDP each holds a shard of every weight, and gathering them is collective.

    Asking PEFT for the state dict of a sharded model instead gives empty tensors (peft issue 2892):
    the local shards, not the weights.
    """
    unwrapped = accelerator.unwrap_model(model)
    trainable = [(name, p) for name, p in unwrapped.named_parameters() if p.requires_grad]
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # full_state_dict + cpu_offload: all-gathered, and kept on the main process only.
        full = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        return {k: v.detach().clone() for k, v in full.items()} if accelerator.is_main_process else {}
    if accelerator.distributed_type == DistributedType.DEEPSPEED and any(hasattr(p, "ds_id") for _, p in trainable):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            return ({name: p.detach().cpu().clone() for name, p in trainable}
                    if accelerator.is_main_process else {})
    return {name: p.detach().cpu().clone() for name, p in trainable} if accelerator.is_main_process else {}


def save_adapter(accelerator: Accelerator, model: Any, output_dir: Path) -> None:
    """adapter_model.safetensors + adapter_config.json (stock PEFT format) into output_dir, gathered
    from every process's shard; the main process writes. Every process must call it."""
    state = adapter_state_dict(accelerator, model)
    if accelerator.is_main_process:
        if not state or any(t.numel() == 0 for t in state.values()):
            raise RuntimeError(f"{output_dir}: the gathered adapter is empty; refusing to save it")
        accelerator.unwrap_model(model).save_pretrained(output_dir, state_dict=state, safe_serialization=True)


def save_checkpoint(accelerator: Accelerator, model: Any, optimizer: Any, step_dir: Path,
                    write_extras: Callable[[Path], None]) -> None:
    """Every process's share of the training state into step_dir, which appears only once complete.

    All processes write into one temporary directory (its name is fixed, so they agree on it
    without talking), the main process adds write_extras(tmp), then renames it into place.
    The run directory must be on a filesystem every node sees.

    What each backend writes besides the adapter and one RNG state per process: ddp the optimizer
    (optimizer.bin); DeepSpeed its engine checkpoint, one optimizer partition per process and no
    frozen weights; FSDP the trainable weights and optimizer state as torch.distributed.checkpoint
    shards (fsdp_state/), which reload at any world size.
    """
    tmp = step_dir.with_name(f".{step_dir.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while saving
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.distributed_type == DistributedType.FSDP:
        _save_fsdp_state(accelerator, model, optimizer, tmp)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.save_state(str(tmp), exclude_frozen_parameters=True)
    else:
        accelerator.save_state(str(tmp))
    save_adapter(accelerator, model, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_extras(tmp)
        publish_dir(tmp, step_dir)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, model: Any, optimizer: Any, step_dir: Path,
                    saved_world_size: int, saved_backend: str) -> bool:
    """Restore adapter, optimizer and this process's RNG states from step_dir.

    Returns whether the RNG streams continue exactly: a checkpoint written by another number of
    processes has no RNG state for some ranks (accelerate then keeps the current ones).
    """
    if not (step_dir / _ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{step_dir}: no {_ADAPTER_WEIGHTS}; the checkpoint is incomplete")
    backend = _backend_of(accelerator)
    if saved_backend != backend:
        raise ConfigError(f"{step_dir}: written under train.backend={saved_backend}, this run uses {backend}; "
                          f"resume with train.backend={saved_backend}, or start afresh with train.resume=false")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and saved_world_size != accelerator.num_processes:
        raise ConfigError(f"{step_dir}: DeepSpeed optimizer partitions of {saved_world_size} processes cannot be "
                          f"re-cut for {accelerator.num_processes}; resume with {saved_world_size} processes, or "
                          f"start afresh with train.resume=false")
    if accelerator.distributed_type == DistributedType.FSDP:
        _load_fsdp_state(accelerator, model, optimizer, step_dir)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.load_state(str(step_dir), load_module_strict=False)  # frozen weights were not saved
    else:
        accelerator.load_state(str(step_dir))
    return saved_world_size == accelerator.num_processes and \
        (step_dir / f"random_states_{accelerator.process_index}.pkl").is_file()


def _backend_of(accelerator: Accelerator) -> str:
    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{state.deepspeed_plugin.zero_stage}"
    return "fsdp" if state.distributed_type == DistributedType.FSDP else "ddp"


_FSDP_STATE = "fsdp_state"


def _save_fsdp_state(accelerator: Accelerator, model: Any, optimizer: Any, output_dir: Path) -> None:
    """Trainable weights and optimizer state as torch.distributed.checkpoint shards, plus RNG states.

    Not accelerate's save_state: under FSDP it writes the whole model state dict, frozen base included.
    """
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import save_accelerator_state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer.optimizer,
                                              options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(output_dir / _FSDP_STATE))
    save_accelerator_state(str(output_dir), [], [], [], [], accelerator.process_index, accelerator.step)


def _load_fsdp_state(accelerator: Accelerator, model: Any, optimizer: Any, input_dir: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from accelerate.checkpointing import load_accelerator_state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer.optimizer, options=options)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(input_dir / _FSDP_STATE))  # in place, re-cut for this world size
    # strict=False: the frozen weights were never saved; every trainable one must have come back.
    result = set_state_dict(model, optimizer.optimizer, model_state_dict=state["model"],
                            optim_state_dict=state["optimizer"],
                            options=StateDictOptions(ignore_frozen_params=True, strict=False))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = trainable & set(getattr(result, "missing_keys", [])) | (trainable - set(state["model"]))
    if missing:
        raise RuntimeError(f"{input_dir / _FSDP_STATE}: trainable weights missing from the checkpoint: "
                           f"{sorted(missing)[:3]}")
    load_accelerator_state(str(input_dir), [], [], [], [], accelerator.process_index)


def release_backend(accelerator: Accelerator) -> None:
    """After training: later model loads in this process (scoring, export) are plain again.

    Under ZeRO-3 transformers builds every model inside deepspeed.zero.Init while the DeepSpeed
    config is registered, and under FSDP non-main processes load weights onto the meta device while
    FSDP_CPU_RAM_EFFICIENT_LOADING is set; both are meant for the training model alone.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    elif accelerator.distributed_type == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import disable_fsdp_ram_efficient_loading

        disable_fsdp_ram_efficient_loading()
