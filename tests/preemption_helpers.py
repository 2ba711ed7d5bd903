"""What the preemption tests share (tests/test_preemption.py without Slurm, tests/test_slurm.py with it):
the settings of the preempted training, helpers to start and signal jobs, and one uninterrupted
reference training made once per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from rerank_dist.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]

# 24 examples in steps of 4, 16 epochs: 96 steps of a few hundredths of a second each, so a signal sent
# at step 2 lands well before the end. LoRA dropout, so the RNG streams must continue exactly. No
# checkpoint before the end except the preemption's: a kill would lose every step, a preemption none.
STEPS = 96
PREEMPT = ["model.lora_dropout=0.1", f"train.epochs={STEPS // 6}", f"train.max_steps={STEPS}",
           "train.save_every=0", "train.save_every_minutes=0", f"train.eval_every={STEPS}", "train.keep_last=0"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "rerank_dist.cli", "launch", "--nproc-per-node", "2", *args]


def copy_run(run_dir: Path, dest: Path, keep_ranker: bool) -> Path:
    """A copy of a finished run without its test-time outputs (and without ranker/ unless kept)."""
    shutil.copytree(run_dir, dest)
    if not keep_ranker:
        shutil.rmtree(dest / "ranker")
    for name in ("rankings_test.parquet", "metrics_test.json", "report.md", "export", "scores"):
        target = dest / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return dest


def log_records(run_dir: Path) -> list[dict]:
    records = []
    log = RunPaths(run_dir).train_log
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return records


def trained_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in log_records(run_dir) if "loss" in r]


def signal_tree(pid: int, signum: int) -> None:
    """signum to pid and all its descendants (torchrun's workers live in sessions of their own)."""
    for p in [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]:
        try:
            os.kill(p, signum)
        except ProcessLookupError:
            pass


_reference: dict[str, Path] = {}


def uninterrupted_training(trained_run, tmp_path_factory) -> Path:
    """The PREEMPT training on 2 processes, never interrupted (made once per session, then shared)."""
    if "train" not in _reference:
        run_dir, overrides = trained_run
        ref = copy_run(run_dir, tmp_path_factory.mktemp("uninterrupted") / "run", keep_ranker=False)
        result = subprocess.run(launch("train", *overrides, f"run_dir={ref}", *PREEMPT), cwd=REPO, env=env(),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        _reference["train"] = ref
    return _reference["train"]


def assert_same_training(resumed: Path, reference: Path) -> None:
    """Same losses at every step and the same final and best adapters, bit for bit."""
    losses = {r["step"]: r["loss"] for r in log_records(resumed) if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in log_records(reference) if "loss" in r}
    for name in (f"step-{STEPS:06d}", "best"):
        a = load_file(reference / "ranker" / name / "adapter_model.safetensors")
        b = load_file(resumed / "ranker" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
