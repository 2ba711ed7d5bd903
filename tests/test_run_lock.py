"""One writer per run directory (run_lock.py): a second writer is refused naming the holder; a lock whose
holder is gone (dead pid, old heartbeat, or this same requeued Slurm job) is taken over; the lock is
re-entrant within a process, released after a stage and on errors, and taken by the main process only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rerank_dist.cli import main
from rerank_dist.run_lock import LOCK_NAME, RunLockError, writer_lock

REPO = Path(__file__).resolve().parents[1]
HOLDER = textwrap.dedent("""
    import sys, time
    from rerank_dist.run_lock import writer_lock
    with writer_lock(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture(autouse=True)
def _one_process_outside_slurm(monkeypatch):
    for name in ("RANK", "SLURM_JOB_ID", "RERANK_DIST_LOCK_HEARTBEAT_S", "RERANK_DIST_LOCK_STALE_S"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def holder(tmp_path):
    """Another process that takes the run directory's lock (as Slurm job 4242, stage train) and sleeps."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "train"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        raise AssertionError(f"the holder did not take the lock: {line!r} {proc.stderr.read()}")
    yield run, proc
    proc.kill()
    proc.wait()


def _plant(run: Path, **fields) -> dict:
    """A lock file as a holder elsewhere would have left it."""
    record = {"host": "node-17", "pid": 12345, "pid_namespace": "", "slurm_job_id": None, "stage": "train",
              "started": time.time() - 600, "heartbeat": time.time(), "token": "planted"}
    record.update(fields)
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps(record))
    return record


def test_a_second_writer_is_refused_naming_the_holder(holder):
    run, proc = holder
    record = json.loads((run / LOCK_NAME).read_text())
    assert record["pid"] == proc.pid and proc.poll() is None  # precondition: a live process holds it
    with pytest.raises(RunLockError) as err:
        with writer_lock(run, "train"):
            raise AssertionError("entered a run directory another process writes")
    message = str(err.value)
    assert "\n" not in message
    for part in (f"host {socket.gethostname()}", f"pid {proc.pid}", "Slurm job 4242", "stage train", "since "):
        assert part in message, (part, message)
    assert json.loads((run / LOCK_NAME).read_text())["token"] == record["token"]  # the holder's lock is untouched


def test_a_second_stage_on_the_command_line_is_refused_and_writes_nothing(holder, capsys):
    """Two `rerank-dist` stages on one run directory: the second exits 2 naming the first."""
    run, proc = holder
    assert proc.poll() is None and not (run / "config.yaml").exists()  # precondition
    assert main(["prepare", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert f"pid {proc.pid}" in err and "being written by another process" in err, err
    assert not (run / "config.yaml").exists() and not (run / "data").exists()


def test_a_lock_whose_process_is_gone_is_taken_over(holder):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)  # kill -9: no chance to release
    proc.wait()
    record = json.loads((run / LOCK_NAME).read_text())
    assert record["pid"] == proc.pid  # precondition: the dead process's lock is still there
    said: list[str] = []
    with writer_lock(run, "train", say=said.append):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any(f"process {proc.pid} is gone" in m for m in said), said
    assert not (run / LOCK_NAME).exists()


def test_a_lock_with_an_old_heartbeat_is_taken_over_a_fresh_one_is_not(tmp_path, monkeypatch):
    """A holder on another node cannot be asked whether it lives: its heartbeat says so."""
    run = tmp_path / "run"
    monkeypatch.setenv("RERANK_DIST_LOCK_STALE_S", "60")
    _plant(run, heartbeat=time.time() - 5)
    with pytest.raises(RunLockError, match="host node-17, pid 12345"):
        with writer_lock(run, "train"):
            pass
    _plant(run, heartbeat=time.time() - 61)
    said: list[str] = []
    with writer_lock(run, "train", say=said.append):
        assert json.loads((run / LOCK_NAME).read_text())["host"] == socket.gethostname()
    assert any("no heartbeat for 61 s" in m for m in said), said


def test_the_same_slurm_job_takes_over_its_predecessors_lock(tmp_path, monkeypatch):
    """A requeued job keeps its id: its restart (on any node) is not refused by its own earlier lock."""
    run = tmp_path / "run"
    _plant(run, slurm_job_id="777")  # fresh heartbeat, another node
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(RunLockError, match="Slurm job 777"):  # another job: refused
        with writer_lock(run, "train"):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    said: list[str] = []
    with writer_lock(run, "train", say=said.append):
        assert json.loads((run / LOCK_NAME).read_text())["slurm_job_id"] == "777"
    assert any("requeued" in m for m in said), said


def test_the_heartbeat_is_refreshed_while_held(tmp_path, monkeypatch):
    monkeypatch.setenv("RERANK_DIST_LOCK_HEARTBEAT_S", "0.05")
    run = tmp_path / "run"
    with writer_lock(run, "score"):
        first = json.loads((run / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.4)
        later = json.loads((run / LOCK_NAME).read_text())
    assert later["heartbeat"] > first and later["stage"] == "score"


def test_reentrant_within_a_process_and_released_on_errors(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="boom"):
        with writer_lock(run, "run"):
            with writer_lock(run, "train"):  # run_all's stages: the same process, not refused
                assert json.loads((run / LOCK_NAME).read_text())["stage"] == "run > train"
                raise ValueError("boom")
    assert not (run / LOCK_NAME).exists()
    assert not run.exists()  # made only for the lock: not left behind


def test_only_the_main_process_takes_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _plant(run)  # a live holder elsewhere
    monkeypatch.setenv("RANK", "1")
    with writer_lock(run, "train"):  # rank 1 is the main process's job: it neither takes nor checks the lock
        assert json.loads((run / LOCK_NAME).read_text())["token"] == "planted"


def test_a_stage_leaves_no_lock_behind(tmp_path):
    run = tmp_path / "run"
    assert main(["prepare", f"run_dir={run}"]) == 0
    assert (run / "data").is_dir() and not (run / LOCK_NAME).exists()


def test_a_bad_timing_variable_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RERANK_DIST_LOCK_STALE_S", "soon")
    with pytest.raises(RunLockError, match=r"^environment variable RERANK_DIST_LOCK_STALE_S='soon': expected"):
        with writer_lock(tmp_path / "run", "train"):
            pass



def test_the_grid_holds_the_run_directorys_lock_for_its_whole_body(tmp_path, monkeypatch):
    """`rerank-dist grid` writes <run_dir>/retriever_grid, so it holds the writer's lock as every stage does."""
    from rerank_dist import pipeline
    from rerank_dist.settings import resolve_config

    seen = []
    monkeypatch.setattr(pipeline, "_retriever_grid",
                        lambda cfg, *a: seen.append(json.loads((tmp_path / "run" / LOCK_NAME).read_text())["stage"]))
    cfg, _ = resolve_config(None, [f"run_dir={tmp_path / 'run'}"])
    pipeline.retriever_grid(cfg, log=lambda m: None)
    assert seen == ["grid"] and not (tmp_path / "run" / LOCK_NAME).exists()  # held during the body, released after
