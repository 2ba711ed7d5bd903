"""Preemption without Slurm: SIGUSR1 sent to every process of a `rerank-dist launch` job (as Slurm
signals every process of a job step) makes training stop after one agreed step with that step's
checkpoint, and scoring stop with the users scored so far saved; the launcher exits 75; running
the same command again finishes the job with results equal to an unbroken run's, bit for bit.

The Slurm side (sbatch --signal, scontrol requeue) is tests/test_slurm.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from rerank_dist import preemption
from rerank_dist.checkpoint import step_dirs
from rerank_dist.io import read_json
from rerank_dist.paths import RunPaths
from tests.preemption_helpers import (PREEMPT, REPO, STEPS, assert_same_training, copy_run, env, launch, log_records,
                                      signal_tree, trained_steps, uninterrupted_training)

pytestmark = pytest.mark.distributed


def test_preemption_module_records_the_first_signal_only():
    preemption.reset()
    previous = signal.getsignal(preemption.SIGNAL)
    try:
        preemption.install()
        assert not preemption.requested() and preemption.seconds_since_signal() is None
        os.kill(os.getpid(), preemption.SIGNAL)
        assert preemption.requested()
        first = preemption.seconds_since_signal()
        time.sleep(0.05)
        os.kill(os.getpid(), preemption.SIGNAL)  # a second warning keeps the first time
        assert preemption.seconds_since_signal() >= first + 0.04
        stop = preemption.Preempted("stopped")
        assert stop.code == preemption.EXIT_REQUEUE == 75 and str(stop) == "stopped"
    finally:
        signal.signal(preemption.SIGNAL, previous)
        preemption.reset()


def test_preempted_training_checkpoints_its_step_and_resumes_bit_identical(trained_run, tmp_path, tmp_path_factory):
    run_dir, overrides = trained_run
    reference = uninterrupted_training(trained_run, tmp_path_factory)
    run = copy_run(run_dir, tmp_path / "run", keep_ranker=False)
    command = launch("train", *overrides, f"run_dir={run}", *PREEMPT)
    proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 300
    while max(trained_steps(run), default=0) < 2:
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before step 2"
        time.sleep(0.02)
    signal_tree(proc.pid, preemption.SIGNAL)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == preemption.EXIT_REQUEUE, output[-3000:]

    records = log_records(run)
    stop = [r for r in records if r.get("event") == "preempted"]
    assert len(stop) == 1, records
    step = stop[0]["step"]
    assert 2 <= step < STEPS
    assert sorted(step_dirs(run / "ranker")) == [step]  # the preemption's checkpoint, at the step it stopped
    assert max(trained_steps(run)) == step  # no step trained past it: nothing to redo
    assert "preempted: training stopped after step" in output
    print(f"preempted at step {step}, checkpoint {stop[0]['signal_to_checkpoint_s']} s after the signal")

    result = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_json(run / "ranker" / "train_summary.json")
    assert summary["world_size"] == 2 and summary["resumed_from"].endswith(f"step-{step:06d}")
    assert trained_steps(run) == list(range(1, STEPS + 1))  # every step once
    assert_same_training(run, reference)


def test_preempted_scoring_keeps_what_it_scored_and_resumes_bit_identical(trained_run, tmp_path):
    """The signal arrives while the model loads: each process scores one batch, saves it and stops;
    the rerun scores the rest. Rankings equal the 1-process run's (scores do not depend on the world)."""
    run_dir, overrides = trained_run
    run = copy_run(run_dir, tmp_path / "run", keep_ranker=True)
    command = launch("score", *overrides, f"run_dir={run}")
    proc = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:  # "process 0 of 2 ..." is printed once the workers' handlers are installed
        lines.append(line)
        if "process 0 of 2" in line:
            signal_tree(proc.pid, preemption.SIGNAL)
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=300)
    output = "".join(lines)
    assert proc.returncode == preemption.EXIT_REQUEUE, output[-3000:]
    parts = sorted((run / "scores" / "test").glob("part-*.npz"))
    saved = sum(len(np.load(p)["index"]) for p in parts)
    assert len(parts) == 2 and saved == 32  # one batch of score.batch_size=16 from each process
    assert not (run / "metrics_test.json").exists()
    assert "scoring stopped with 32 of 610 prompts scored" in output

    result = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(RunPaths(run).metrics("test"))
    assert metrics["resumed_prompts"] == 32 and metrics["world_size"] == 2
    assert metrics["reranker"]["num_users"] == 610
    a, b = pd.read_parquet(RunPaths(run_dir).rankings("test")), pd.read_parquet(RunPaths(run).rankings("test"))
    assert a["user"].tolist() == b["user"].tolist()
    assert np.array_equal(np.stack(a["scores"]), np.stack(b["scores"]))
    assert metrics["reranker"] == read_json(RunPaths(run_dir).metrics("test"))["reranker"]
    assert not (run / "scores" / "test").exists()  # the parts are folded into the rankings
