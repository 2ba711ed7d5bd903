"""The Slurm scripts on a real Slurm: a two-node cluster on this machine (tests/slurm_cluster.py, started
once per session, installed with apt-get when missing), CPU nodes, the tiny model of tests/conftest.py.

- a 2-node `sbatch slurm/train.sh` job trains with a world of 2;
- a job signalled with USR1 mid-training (what `--signal=USR1@300` sends before the time limit)
  checkpoints, requeues itself and ends with the adapter of an uninterrupted run, bit for bit;
- `slurm/submit.sh` runs prepare -> train -> score as three dependent jobs, end to end;
- `slurm/tables.sh` submits one job per cell of `rerank-dist tables` that is not done, each after the
  cell it reads, and the tables job after all of them.

Select them with `pytest -m slurm`; they skip (saying why) only where there is no root or no apt-get.
The script checks (shellcheck, --dry-run) need no cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rerank_dist import preemption
from rerank_dist.checkpoint import step_dirs
from rerank_dist.io import read_json
from rerank_dist.paths import RunPaths
from tests import slurm_cluster
from tests.conftest import run_overrides
from tests.preemption_helpers import (PREEMPT, REPO, STEPS, assert_same_training, copy_run, log_records,
                                      trained_steps, uninterrupted_training)

SLURM = REPO / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sh"))
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


# ---------------------------------------------------------------- the scripts themselves (no cluster)


def test_slurm_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run installs it)")
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS), str(SLURM / "site.env.example"), ".ci/run",
                             "scripts/check_fresh_install.sh", "scripts/install.sh", "bench/gpu.sh", "bench/gpu_prepare.sh"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _site_free_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """An environment that no developer's slurm/site.env or RERANK_* variables leak into."""
    site = tmp_path / "site.env"
    site.write_text("")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RERANK_")}
    return {**base, "RERANK_SITE_ENV": str(site), **settings}


def test_submit_dry_run_prints_the_dependent_jobs_with_site_settings(tmp_path):
    env = _site_free_env(tmp_path, RERANK_PARTITION="gpu", RERANK_ACCOUNT="lab", RERANK_NODES="4",
                         RERANK_GPUS_PER_NODE="4", RERANK_SIGNAL_LEAD="600", RERANK_SBATCH_ARGS="--qos=high")
    result = subprocess.run(["bash", str(SLURM / "submit.sh"), "--dry-run", "configs/qwen3_4b_qlora.yaml",
                             "train.lr=1e-4"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("sbatch ")]
    assert [re.search(r"slurm/(\w+)\.sh", line).group(1) for line in lines] == ["prepare", "train", "score"]
    prepare, train, score = lines
    assert "--dependency" not in prepare and "--gpus-per-node" not in prepare
    assert "--dependency=afterok:<prepare-job-id>" in train and "--dependency=afterok:<train-job-id>" in score
    for line in (train, score):
        for option in ("--nodes=4", "--gpus-per-node=4", "--signal=USR1@600", "--requeue"):
            assert option in line
    for line in lines:
        assert "--partition=gpu" in line and "--account=lab" in line and "--qos=high" in line
        assert line.endswith(f"--config {REPO}/configs/qwen3_4b_qlora.yaml train.lr=1e-4")
    assert not (tmp_path / "logs").exists()


def test_job_script_dry_run_prints_the_per_node_launch(tmp_path):
    env = _site_free_env(tmp_path, RERANK_CONTAINER="apptainer exec --nv img.sif", RERANK_NPROC_PER_NODE="4")
    result = subprocess.run(["bash", str(SLURM / "train.sh"), "--dry-run", "cfg.yaml", "train.lr=1e-4"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ("apptainer exec --nv img.sif rerank-dist launch --nnodes <N> --node-rank <SLURM_NODEID> "
            "--master-addr <node-0-address> --master-port <port> --nproc-per-node 4 train --config cfg.yaml "
            "train.lr=1e-4") in result.stdout
    for args, error in ((["train.lr=1e-4"], "not inside a Slurm job"), (["cfg.yaml"], "config file cfg.yaml not found"),
                        (["lr"], "'lr' is not an override")):
        refused = subprocess.run(["bash", str(SLURM / "train.sh"), *args], cwd=tmp_path, env=env,
                                 capture_output=True, text=True)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and error in refused.stderr


def test_tables_dry_run_submits_each_cell_not_done_after_the_cell_it_reads(tmp_path):
    env = {**_site_free_env(tmp_path, RERANK_GPUS_PER_NODE="4", RERANK_PREPARE_CPUS="6"), "PYTHONPATH": str(REPO),
           "RERANK_DIST": f"{sys.executable} -m rerank_dist.cli"}
    result = subprocess.run(["bash", str(SLURM / "tables.sh"), "--dry-run", "train.lr=1e-4", "--root", "out",
                             "--seeds", "0", "1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    jobs = {re.search(r"--cell (\S+)", line).group(1) if "--cell" in line else "tables": line
            for line in result.stdout.splitlines() if line.startswith("sbatch ")}
    cell = "ml-latest-small/seed{}/{}"
    assert list(jobs) == ["ml-latest-small/grid", cell.format(0, "retriever"), cell.format(0, "ranker"),
                          cell.format(1, "retriever"), cell.format(1, "ranker"), "tables"]
    assert "--dependency" not in jobs["ml-latest-small/grid"]
    assert "--dependency=afterok:<ml-latest-small/grid-job-id>" in jobs[cell.format(1, "retriever")]
    assert f"--dependency=afterok:<{cell.format(1, 'retriever')}-job-id>" in jobs[cell.format(1, "ranker")]
    assert jobs["tables"].count("-job-id>") == 5 and "--dependency=afterany:" in jobs["tables"]
    assert "--gpus-per-node=4" in jobs[cell.format(0, "ranker")] and "tables_cell.sh nodes --cell" in jobs[cell.format(0, "ranker")]
    assert "--gpus-per-node" not in jobs[cell.format(0, "retriever")] and "--cpus-per-task=6" in jobs[cell.format(0, "retriever")]
    assert jobs[cell.format(0, "ranker")].endswith("train.lr=1e-4 --root out --seeds 0 1")
    refused = subprocess.run(["bash", str(SLURM / "tables.sh"), "--dry-run", "--datasets", "nosuch"], cwd=tmp_path,
                             env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown dataset 'nosuch'" in refused.stderr and "sbatch" not in refused.stdout


# ---------------------------------------------------------------- on a two-node cluster


@pytest.fixture(scope="session")
def cluster():
    """(environment for Slurm commands, cluster directory) of a running two-node cluster."""
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    slurm_cluster.install()
    directory = Path(tempfile.mkdtemp(prefix="rerank-slurm-", dir="/tmp"))
    try:
        yield slurm_cluster.start(directory), directory
    finally:
        slurm_cluster.stop(directory)
        shutil.rmtree(directory, ignore_errors=True)


def _job_env(cluster_env: dict[str, str], workdir: Path, **settings: str) -> dict[str, str]:
    """What sbatch passes on to the jobs: this interpreter, CPU nodes, one thread per process."""
    workdir.mkdir(parents=True, exist_ok=True)
    site = workdir / "site.env"
    site.write_text("")
    base = {k: v for k, v in cluster_env.items() if not k.startswith("RERANK_")}
    return {**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "RERANK_SITE_ENV": str(site), "RERANK_DIST": f"{sys.executable} -m rerank_dist.cli",
            "RERANK_NODES": "2", "RERANK_GPUS_PER_NODE": "0", "RERANK_CPUS_PER_TASK": "1",
            "RERANK_PREPARE_CPUS": "1", **settings}


def _sbatch(env: dict[str, str], workdir: Path, *args: str) -> str:
    (workdir / "logs").mkdir(exist_ok=True)
    result = subprocess.run(["sbatch", "--parsable", *args], cwd=workdir, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _job(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(env: dict[str, str], job: str, timeout: float = 300, until=None) -> dict[str, str]:
    """Poll the job until it has finished (or until(info) holds); returns scontrol's fields."""
    deadline = time.time() + timeout
    while True:
        info = _job(env, job)
        if (until(info) if until else info.get("JobState") in FINISHED):
            return info
        assert time.time() < deadline, f"job {job} still {info.get('JobState')} after {timeout:.0f} s"
        time.sleep(1)


def _sacct(env: dict[str, str], *jobs: str) -> str:
    """sacct's view of the jobs, from the job completion log (no slurmdbd on this cluster)."""
    result = subprocess.run(["sacct", "--completion", "-j", ",".join(jobs), "--format",
                             "JobID,JobName%16,State,ExitCode,DerivedExitCode,Elapsed,Start,End"], env=env,
                            capture_output=True, text=True)
    return result.stdout.rstrip()


def _log(workdir: Path, name: str, job: str) -> str:
    # Two nodes' progress bars interleave in one file, so a character may be cut in two.
    return (workdir / "logs" / f"{name}-{job}.out").read_text(errors="replace")


TWO_NODES = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.mark.slurm
def test_two_node_training_job(cluster, trained_run, tmp_path):
    """sbatch slurm/train.sh directly (no submit.sh): the script finds lib.sh through scontrol, each
    node's task reads its own rank, and the two processes form one world."""
    cluster_env, _ = cluster
    run_dir, overrides = trained_run
    run = copy_run(run_dir, tmp_path / "run", keep_ranker=False)
    env = _job_env(cluster_env, tmp_path)
    started = time.time()
    job = _sbatch(env, tmp_path, *TWO_NODES, str(SLURM / "train.sh"), *overrides, f"run_dir={run}",
                  "train.max_steps=2", "train.eval_every=2")
    info = _wait(env, job)
    log = _log(tmp_path, "rerank-train", job)
    print(f"\n2-node job {job}: {time.time() - started:.0f} s wall\n{_sacct(env, job)}")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    summary = read_json(run / "ranker" / "train_summary.json")
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert "0: process 0 of 2" in log  # srun --label: task 0, on node 0, holds the main process
    assert "0: launch: 2 node(s) x 1 process(es); node rank 0" in log
    assert "1: launch: 2 node(s) x 1 process(es); node rank 1" in log


@pytest.mark.slurm
def test_preempted_job_requeues_itself_and_resumes_bit_identical(cluster, trained_run, tmp_path, tmp_path_factory):
    """USR1 to every task of a running 2-node job (scancel --signal=USR1, as --signal=USR1@lead does):
    the processes agree on a step, checkpoint it and exit 75; the script requeues the job, which
    resumes from that checkpoint and ends with the uninterrupted run's adapter, bit for bit."""
    cluster_env, _ = cluster
    run_dir, overrides = trained_run
    reference = uninterrupted_training(trained_run, tmp_path_factory)
    run = copy_run(run_dir, tmp_path / "run", keep_ranker=False)
    env = _job_env(cluster_env, tmp_path)
    job = _sbatch(env, tmp_path, *TWO_NODES, str(SLURM / "train.sh"), *overrides, f"run_dir={run}", *PREEMPT)
    deadline = time.time() + 300
    while max(trained_steps(run), default=0) < 2:
        state = _job(env, job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}: {_log(tmp_path, 'rerank-train', job)}"
        assert time.time() < deadline, "the job never reached step 2"
        time.sleep(0.1)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    requeued = _wait(env, job, timeout=120, until=lambda i: int(i.get("Restarts", 0)) >= 1)
    requeue_s = time.time() - signalled
    # Read before the requeued job starts (Slurm holds it for AuthInfo's cred_expire, 5 s here).
    before, checkpoints = trained_steps(run), sorted(step_dirs(run / "ranker"))
    stopped_at = [r for r in log_records(run) if r.get("event") == "preempted"]
    assert len(stopped_at) == 1, _log(tmp_path, "rerank-train", job)[-3000:]
    step = stopped_at[0]["step"]
    assert step < STEPS
    assert checkpoints == [step] and before == list(range(1, step + 1))  # nothing trained past the checkpoint
    info = _wait(env, job, timeout=300)
    log = _log(tmp_path, "rerank-train", job)
    print(f"\npreempted job {job}: signal -> checkpoint of step {step} in {stopped_at[0]['signal_to_checkpoint_s']} s; "
          f"requeued ({requeued['JobState']}, {requeued.get('Reason')}) {requeue_s:.1f} s after the signal; "
          f"steps lost: {max(before) - step}\n{_sacct(env, job)}\n"
          f"scontrol: JobState={info['JobState']} ExitCode={info['ExitCode']} Restarts={info['Restarts']} "
          f"RunTime={info['RunTime']}")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    # The completion log holds both runs: the requeued one (recorded as the state it went back to) and
    # the one that finished.
    runs = [line.split() for line in _sacct(env, job).splitlines()[2:]]
    assert len(runs) == 2 and runs[1][2:4] == ["COMPLETED", "0:0"]
    assert f"exit status {preemption.EXIT_REQUEUE}" in log and f"requeueing job {job} (restart 1)" in log
    assert f"resuming from {run / 'ranker' / f'step-{step:06d}'}" in log
    summary = read_json(run / "ranker" / "train_summary.json")
    assert summary["world_size"] == 2 and summary["resumed_from"].endswith(f"step-{step:06d}")
    assert trained_steps(run) == list(range(1, STEPS + 1))  # each step once: none lost, none repeated
    assert_same_training(run, reference)


@pytest.mark.slurm
def test_submit_runs_prepare_train_score_as_dependent_jobs(cluster, model_dir, tmp_path):
    """slurm/submit.sh on a new run directory: a CPU job (data + retrievers), then a 2-node training
    job, then a 2-node scoring job (with export and report), each after the one before succeeded.
    The scoring job is sent USR1 while its model loads: it saves what it scored, requeues itself and
    the requeued job scores only the rest."""
    cluster_env, _ = cluster
    run = tmp_path / "run"
    env = _job_env(cluster_env, tmp_path)
    started = time.time()
    result = subprocess.run(["bash", str(SLURM / "submit.sh"), *run_overrides(run, model_dir),
                             "train.max_steps=2", "train.eval_every=2"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ids = dict(re.findall(r"(prepare|train|score) (\d+)", result.stdout))
    assert list(ids) == ["prepare", "train", "score"], result.stdout
    assert f"afterok:{ids['prepare']}" in _job(env, ids["train"])["Dependency"]
    assert f"afterok:{ids['train']}" in _job(env, ids["score"])["Dependency"]
    score_log = tmp_path / "logs" / f"rerank-score-{ids['score']}.out"
    deadline = time.time() + 400
    # Printed once both processes have built their process group, so their handlers are installed.
    while "0: process 0 of 2" not in (score_log.read_text(errors="replace") if score_log.is_file() else ""):
        assert _job(env, ids["score"]).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            {name: _job(env, job).get("JobState") for name, job in ids.items()}
        assert time.time() < deadline, "the scoring job never started scoring"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", ids["score"]], env=env, check=True)
    infos = {name: _wait(env, job, timeout=400) for name, job in ids.items()}
    print(f"\nchain: {time.time() - started:.0f} s wall\n{_sacct(env, *ids.values())}")
    for name, info in infos.items():
        log = _log(tmp_path, f"rerank-{name}", ids[name])
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{name}: {log[-3000:]}"
    # Each job started after the one before it ended.
    assert infos["prepare"]["EndTime"] <= infos["train"]["StartTime"] <= infos["train"]["EndTime"] <= \
        infos["score"]["StartTime"]
    assert infos["prepare"]["NumNodes"] == "1" and infos["train"]["NumNodes"] == infos["score"]["NumNodes"] == "2"
    assert read_json(run / "ranker" / "train_summary.json")["world_size"] == 2
    metrics = read_json(RunPaths(run).metrics("test"))
    assert metrics["world_size"] == 2 and metrics["reranker"]["num_users"] == 610
    # One batch of score.batch_size=16 per process was saved before the stop; the rest scored after.
    assert infos["score"]["Restarts"] == "1" and metrics["resumed_prompts"] == 32
    assert "scoring stopped with 32 of 610 prompts scored" in _log(tmp_path, "rerank-score", ids["score"])
    assert (run / "report.md").is_file() and (run / "export" / "merged" / "config.json").is_file()


@pytest.mark.slurm
def test_tables_runs_each_cell_as_a_job_after_the_cell_it_reads(cluster, trained_run, tmp_path):
    """slurm/tables.sh --no-grid --seeds 42 7: seed 42 is a copy of the trained run whose scores were lost
    (its retriever is done, so not submitted); seed 7 is new. Jobs: seed42/ranker, seed7/retriever,
    seed7/ranker after seed7/retriever, and the tables after all three."""
    cluster_env, _ = cluster
    root = tmp_path / "tables"
    run42 = root / "ml-latest-small" / "seed42"
    shutil.copytree(trained_run[0], run42)
    (run42 / "scores" / "stage.json").unlink()
    env = _job_env(cluster_env, tmp_path, RERANK_NODES="1")
    base = [o for o in trained_run[1] if not o.startswith("run_dir=")]
    started = time.time()
    result = subprocess.run(["bash", str(SLURM / "tables.sh"), *base, "--root", "tables", "--no-grid", "--seeds",
                             "42", "7"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ml-latest-small/seed42/retriever: done, not submitted" in result.stdout
    ids = dict(re.findall(r"^(\S+): (\d+)", result.stdout, re.M))
    cell = "ml-latest-small/seed{}/{}"
    assert list(ids) == [cell.format(42, "ranker"), cell.format(7, "retriever"), cell.format(7, "ranker"), "tables"]
    assert f"afterok:{ids[cell.format(7, 'retriever')]}" in _job(env, ids[cell.format(7, "ranker")])["Dependency"]
    assert _job(env, ids[cell.format(42, "ranker")])["Dependency"] == "(null)"
    infos = {name: _wait(env, job, timeout=400) for name, job in ids.items()}
    print(f"\ntables on Slurm: {time.time() - started:.0f} s wall\n{_sacct(env, *ids.values())}")
    for name, info in infos.items():
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), name
    assert infos[cell.format(7, "retriever")]["EndTime"] <= infos[cell.format(7, "ranker")]["StartTime"]
    assert max(i["EndTime"] for n, i in infos.items() if n != "tables") <= infos["tables"]["StartTime"]
    written = read_json(root / "tables.json")
    assert set(written["cells"].values()) == {"done"}
    assert written["datasets"][0]["rows"]["ranker"]["seeds"] == [42, 7]
    assert read_json(RunPaths(root / "ml-latest-small" / "seed7").metrics("test"))["reranker"]["num_users"] == 610
