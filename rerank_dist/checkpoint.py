"""What a training run leaves on disk, and how a restart makes it consistent again.

``ranker/step-000200/`` is one resumable checkpoint, written by every process together through
``accelerator.save_state`` (``distributed.save_checkpoint``):

- ``adapter_model.safetensors``, ``adapter_config.json`` (+ peft's ``README.md``): the LoRA adapter
  only, never the frozen base;
- the optimizer state: ``optimizer.bin`` under ddp (loaded back with ``weights_only=True``);
  DeepSpeed's engine checkpoint under zero2 / zero3 (``pytorch_model/``: one optimizer partition
  per process and the trainable weights, no frozen ones; ``latest``); under fsdp
  torch.distributed.checkpoint shards of the trainable weights and the optimizer (``fsdp_state/``);
- ``random_states_<rank>.pkl``: each process's RNG states (torch, numpy, python), so LoRA dropout
  continues the same stream;
- ``trainer_state.json``: step, epoch, position in the epoch, best validation so far, the
  scheduler's state (plain JSON, no pickle) and the batch plan;
- ``config.yaml`` and ``verbalizer.json`` (labels, their token ids, the step).

A directory appears only once complete (built under a temporary name, then renamed), so the
newest ``step-*`` is always loadable. ``best/`` is a copy of the adapter files of the step with
the best validation NDCG@10; that step's checkpoint is always kept, so ``best/`` can be rebuilt
from it. After a restart from step N, ``reconcile_run`` drops log lines past N and puts back the
``best/`` that was current at step N.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

from rerank_dist.io import atomic_dir, atomic_write_text, read_json, read_jsonl, write_json
from rerank_dist.paths import RunPaths

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
ADAPTER_FILES = {"README.md", "adapter_model.safetensors", "adapter_config.json"}
BEST_FILES = ADAPTER_FILES | {"config.yaml", "verbalizer.json"}


# What holds the optimizer state, by backend (top-level names in a step directory).
OPTIMIZER_FILES = {"ddp": {"optimizer.bin"}, "zero2": {"pytorch_model", "latest", "zero_to_fp32.py", "zero_to_torch.py"},
                   "zero3": {"pytorch_model", "latest", "zero_to_fp32.py", "zero_to_torch.py"}, "fsdp": {"fsdp_state"}}


def step_files(world_size: int, backend: str = "ddp") -> set[str]:
    """The exact top-level file set of a step-NNNNNN/ checkpoint written by world_size processes."""
    return (BEST_FILES | {TRAINER_STATE} | OPTIMIZER_FILES[backend]
            | {f"random_states_{r}.pkl" for r in range(world_size)})


@dataclasses.dataclass
class TrainerState:
    """Where a training run stands; saved as trainer_state.json in every checkpoint."""

    step: int = 0                 # optimizer steps done
    epoch: int = 0                # current epoch (0-based)
    steps_in_epoch: int = 0       # optimizer steps done within the current epoch
    best_ndcg: float = -1.0       # best validation NDCG@10 so far (-1: no validation yet)
    best_step: int = 0            # the step that reached it (0: none)
    evals_since_best: int = 0     # validations since the best one (early stopping: train.patience)
    total_steps: int = 0
    world_size: int = 1           # processes that wrote the checkpoint
    accumulation: int = 1         # forward passes per optimizer step on each process
    backend: str = "ddp"          # train.backend that wrote the checkpoint (its optimizer files differ)
    scheduler: dict[str, Any] = dataclasses.field(default_factory=dict)  # lr scheduler state_dict

    @classmethod
    def read(cls, step_dir: Path) -> "TrainerState":
        raw = read_json(step_dir / TRAINER_STATE)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def write(self, step_dir: Path) -> None:
        write_json(step_dir / TRAINER_STATE, dataclasses.asdict(self))


def step_dirs(ranker_dir: Path) -> dict[int, Path]:
    """Complete step-NNNNNN/ checkpoints by step (a directory without trainer_state.json is ignored)."""
    if not ranker_dir.is_dir():
        return {}
    found = {int(m.group(1)): p for p in ranker_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))}
    return {s: p for s, p in found.items() if (p / TRAINER_STATE).is_file()}


def latest_step_dir(ranker_dir: Path) -> Path | None:
    """Newest complete step-NNNNNN/ directory, or None."""
    found = step_dirs(ranker_dir)
    return found[max(found)] if found else None


def prune_step_dirs(ranker_dir: Path, keep_last: int, best_step: int) -> list[int]:
    """Delete all but the newest keep_last checkpoints, never the best step's (keep_last 0: keep all)."""
    found = step_dirs(ranker_dir)
    if not keep_last:
        return []
    keep = set(sorted(found)[-keep_last:]) | {best_step}
    removed = [s for s in sorted(found) if s not in keep]
    for s in removed:
        shutil.rmtree(found[s])
    return removed


def publish_best(step_dir: Path, best_dir: Path) -> None:
    """best/ := the adapter files of one checkpoint (atomically, replacing the old best/)."""
    with atomic_dir(best_dir) as tmp:
        for name in BEST_FILES:
            if (step_dir / name).is_file():
                shutil.copy2(step_dir / name, tmp / name)


def best_step_on_disk(best_dir: Path) -> int | None:
    verbalizer = best_dir / "verbalizer.json"
    return read_json(verbalizer).get("step") if verbalizer.is_file() else None


def reconcile_run(paths: RunPaths, state: TrainerState | None) -> list[str]:
    """Make the log and best/ agree with the checkpoint training restarts from (None: a fresh start).

    A run killed after its last checkpoint leaves log lines, and possibly a best/, from steps that
    are about to be trained again; keeping them would log those steps twice and could score an
    adapter the resumed run never produced. Returns what was changed, one line each.
    """
    step = state.step if state is not None else 0
    changes = []
    if paths.train_log.is_file():
        records, cut = read_jsonl(paths.train_log)
        kept = [r for r in records if r.get("step", 0) <= step]
        if cut or len(kept) != len(records):
            # Rewritten whole (atomically): a cut line left in place would merge with the next append.
            atomic_write_text(paths.train_log, "".join(json.dumps(r) + "\n" for r in kept))
        if cut:
            changes.append(f"dropped the cut last line (line {cut}) of {paths.train_log.name}: "
                           f"the previous run was killed while writing it")
        if len(kept) != len(records):
            changes.append(f"dropped {len(records) - len(kept)} log line(s) after step {step}")
    best_step = state.best_step if state is not None else 0
    on_disk = best_step_on_disk(paths.best)
    if on_disk == best_step or (on_disk is None and not best_step):
        return changes
    source = paths.step_dir(best_step)
    if best_step and (source / "adapter_model.safetensors").is_file():
        publish_best(source, paths.best)
        changes.append(f"best/ set to step {best_step}'s adapter (it held step {on_disk})")
    elif paths.best.exists():
        shutil.rmtree(paths.best)
        changes.append(f"removed best/ (step {on_disk}): the run restarts from step {step}, whose best "
                       f"{'has no checkpoint left' if best_step else 'does not exist yet'}")
    return changes
