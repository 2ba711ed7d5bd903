"""Several processes for real: `rerank-dist launch` on 2 CPU processes (gloo) and on 2 "nodes" of this
machine. Every test asserts the world size its outputs were made with, so a launcher that quietly
starts one process fails it.

Uses the session's tiny run (tests/conftest.py) and copies it; each launch costs a few seconds of
process start-up, so the runs are short.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from rerank_dist.checkpoint import latest_step_dir, step_files
from rerank_dist.io import read_json
from rerank_dist.paths import RunPaths
from tests.preemption_helpers import copy_run

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[1]
# Training runs compared across world sizes: no LoRA dropout, so every process draws the same
# (no) masks, and the trajectories may differ only by the order in which gradients are summed.
NO_DROPOUT = ["model.lora_dropout=0", "train.max_steps=4", "train.eval_every=4", "train.save_every=0"]


def _command(*launch_args: str) -> list[str]:
    return [sys.executable, "-m", "rerank_dist.cli", *launch_args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(*launch_args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(*launch_args), cwd=REPO, env={**_env(), **(env or {})}, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _copy(run_dir: Path, dest: Path, keep_ranker: bool = True) -> Path:
    return copy_run(run_dir, dest, keep_ranker)


def _losses(run_dir: Path) -> dict[int, float]:
    log = [json.loads(line) for line in RunPaths(run_dir).train_log.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in log if "loss" in r}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- one node, two processes


def test_scoring_on_two_processes_equals_one_process_exactly(trained_run, tmp_path):
    run_dir, overrides = trained_run
    copy = _copy(run_dir, tmp_path / "run")
    _run("launch", "--nproc-per-node", "2", "score", *overrides, f"run_dir={copy}")
    one, two = read_json(RunPaths(run_dir).metrics("test")), read_json(RunPaths(copy).metrics("test"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    a, b = pd.read_parquet(RunPaths(run_dir).rankings("test")), pd.read_parquet(RunPaths(copy).rankings("test"))
    assert a["user"].tolist() == b["user"].tolist()
    assert np.array_equal(np.stack(a["scores"]), np.stack(b["scores"]))  # fp32, bit for bit
    assert one["reranker"] == two["reranker"]


def test_training_on_two_processes_packed_matches_one_process_padded(trained_run, tmp_path):
    """Equal global batch (4): 1 process x micro-batch 2 x 2 accumulation against 2 processes x 2 x 1.
    The examples store is built afresh in both: in 3 parts of 8 rows, which the 2 processes share.
    Both in the length-grouped order (train.length_grouping), whose steps must not depend on the world size;
    the 2 processes with their micro-batches packed into one unpadded row each (train.packing)."""
    run_dir, overrides = trained_run
    solo, duo = _copy(run_dir, tmp_path / "solo", False), _copy(run_dir, tmp_path / "duo", False)
    for copy in (solo, duo):
        shutil.rmtree(copy / "examples")
    parts = {"RERANK_DIST_EXAMPLE_PART_ROWS": "8"}
    grouped = [*NO_DROPOUT, "train.length_grouping=2"]
    _run("launch", "--nproc-per-node", "1", "train", *overrides, f"run_dir={solo}", *grouped, env=parts)
    built = _run("launch", "--nproc-per-node", "2", "train", *overrides, f"run_dir={duo}", *grouped,
                 "train.packing=true", env=parts)
    assert "3 of 3 parts to make, shared by 2 process(es)" in built.stdout
    a, b = ([row for f in sorted((r / "examples" / "train").glob("part-*.arrow"))
             for row in pa.ipc.open_stream(str(f)).read_all().to_pylist()] for r in (solo, duo))
    assert len(a) == 24 and a == b  # the same rows in the same order, whoever built which part
    s1, s2 = read_json(solo / "ranker" / "train_summary.json"), read_json(duo / "ranker" / "train_summary.json")
    assert (s1["world_size"], s1["accumulation"]) == (1, 2) and (s2["world_size"], s2["accumulation"]) == (2, 1)
    assert s1["length_grouping"] == s2["length_grouping"] == 2
    assert (s1["packing"], s2["packing"]) == (False, True)
    assert s1["padding_share"] > 0 and s2["padding_share"] == 0  # padded micro-batches against packed rows
    l1, l2 = _losses(solo), _losses(duo)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    loss_diff = max(abs(l1[s] - l2[s]) for s in l1)
    w1, w2 = (load_file(latest_step_dir(r / "ranker") / "adapter_model.safetensors") for r in (solo, duo))
    assert w1.keys() == w2.keys()
    weight_diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"2 vs 1 process: max loss diff {loss_diff:.2e}, max adapter diff {weight_diff:.2e}")
    # Only the summation order of gradients differs (fp32): far below what one lr=1e-2 step moves.
    assert loss_diff <= 1e-5 and weight_diff <= 1e-5
    assert max(abs(v).max().item() for k, v in w1.items() if "lora_B" in k) > 1e-3  # the adapter really trained


# Retriever trained for one short epoch; two training prefixes per user and a held-out retriever, so the
# training candidates come from a second checkpoint that the other process must load too.
RETRIEVER = ["retriever.embed_dim=16", "retriever.max_epochs=1", "retriever.max_len=50", "retriever.batch_size=64",
             "retriever.max_minutes=0", "retriever.train_prefixes_per_user=2", "retriever.train_candidates=held_out"]


def test_candidates_on_two_processes_equal_one_process_exactly(tmp_path):
    """`launch retrieve` on 2 processes: the main one trains, both make candidates from shares of the same
    fixed batches, the main one writes. Every file equals the 1-process one: rows, order, float scores."""
    prepared = tmp_path / "prepared"
    _run("prepare", f"run_dir={prepared}", f"model.cache_dir={tmp_path / 'cache'}", *RETRIEVER)
    solo, duo = (shutil.copytree(prepared, tmp_path / name) for name in ("solo", "duo"))
    _run("launch", "--nproc-per-node", "1", "retrieve", f"run_dir={solo}", *RETRIEVER)
    _run("launch", "--nproc-per-node", "2", "retrieve", f"run_dir={duo}", *RETRIEVER)
    one, two = (read_json(RunPaths(r).retriever / "metrics_test.json") for r in (solo, duo))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["examples"] == two["examples"] == {"train": 1220, "val": 610, "test": 610}  # 39 and 20 batches of 32
    assert one["full_catalogue"] == two["full_catalogue"]  # the test ranks, shared the same way
    for split in ("train", "val", "test"):
        a, b = (pd.read_parquet(RunPaths(r).candidates(split)) for r in (solo, duo))
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        assert np.array_equal(np.stack(a["retriever_scores"]), np.stack(b["retriever_scores"]))  # bit for bit
    # The other process loaded both checkpoints the main one trained: the same weights on disk.
    for sub in ("", "held_out"):
        w1, w2 = (load_file(RunPaths(r).retriever / sub / "model.safetensors") for r in (solo, duo))
        assert all(torch.equal(w1[k], w2[k]) for k in w1)


# ---------------------------------------------------------------- two nodes on one machine


def test_two_nodes_on_localhost_train_and_score(trained_run, tmp_path):
    """2 nodes x 1 process: machine rank 0 and 1 meet at 127.0.0.1 and run train + score together."""
    run_dir, overrides = trained_run
    copy = _copy(run_dir, tmp_path / "run", keep_ranker=False)
    port = str(_free_port())
    nodes = [subprocess.Popen(_command("launch", "--nnodes", "2", "--node-rank", str(rank), "--master-addr",
                                       "127.0.0.1", "--master-port", port, "--nproc-per-node", "1", "run",
                                       *overrides, f"run_dir={copy}", *NO_DROPOUT),
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-4000:]
    assert "process 0 of 2" in outputs[0]  # node 0 holds the main process
    summary = read_json(copy / "ranker" / "train_summary.json")
    metrics = read_json(RunPaths(copy).metrics("test"))
    assert summary["world_size"] == 2 and metrics["world_size"] == 2
    step_dir = latest_step_dir(copy / "ranker")
    assert {p.name for p in step_dir.iterdir()} == step_files(2)  # one RNG state per rank
    assert metrics["reranker"]["num_users"] == 610
    assert (copy / "export" / "merged" / "config.json").is_file()


# ---------------------------------------------------------------- exact resume


# 24 examples in steps of 4: 6 steps, one epoch.
RESUME = ["model.lora_dropout=0.1", "train.max_steps=6", "train.save_every=2", "train.eval_every=2",
          "train.eval_users=200", "train.keep_last=0", "train.save_every_minutes=0"]


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _logged_steps(log: Path) -> list[int]:
    steps = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if max(_logged_steps(log), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never appeared in {log}")


def test_killed_two_process_run_resumes_bit_identical(trained_run, tmp_path):
    """SIGKILL a 2-process run after step 5 (last checkpoint: step 4), start it again: the final adapter
    equals an uninterrupted run's bit for bit (LoRA dropout 0.1, so the RNG streams must continue),
    and the log holds each step once."""
    run_dir, overrides = trained_run
    whole, killed = _copy(run_dir, tmp_path / "whole", False), _copy(run_dir, tmp_path / "killed", False)
    _run("launch", "--nproc-per-node", "2", "train", *overrides, f"run_dir={whole}", *RESUME)

    args = _command("launch", "--nproc-per-node", "2", "train", *overrides, f"run_dir={killed}", *RESUME)
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for_step(RunPaths(killed).train_log, 5, proc)
    finally:
        # torchrun starts its workers in sessions of their own: kill the whole tree, as a lost node would.
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)
    # The precondition: killed between checkpoints, with logged work past the last one.
    assert latest_step_dir(killed / "ranker").name == "step-000004"
    assert not (killed / "ranker" / "train_summary.json").exists()
    assert max(_losses(killed)) >= 5

    restarted = _run("launch", "--nproc-per-node", "2", "train", *overrides, f"run_dir={killed}", *RESUME)
    assert "examples: reusing" in restarted.stdout  # the store the killed run built, not built again
    summary = read_json(killed / "ranker" / "train_summary.json")
    assert summary["world_size"] == 2 and summary["resumed_from"].endswith("step-000004")
    log = [json.loads(line) for line in RunPaths(killed).train_log.read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in log if r.get("event") == "eval"] == [2, 4, 6]
    assert _losses(killed) == _losses(whole)
    for name in ("step-000006", "best"):
        a = load_file(whole / "ranker" / name / "adapter_model.safetensors")
        b = load_file(killed / "ranker" / name / "adapter_model.safetensors")
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"resume: {name} max abs diff {diff}")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert read_json(whole / "ranker" / "best" / "verbalizer.json") == \
        read_json(killed / "ranker" / "best" / "verbalizer.json")
