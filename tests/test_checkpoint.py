"""Checkpoint directories on disk: which are kept, and how a restart puts the log and best/ back in step."""

from __future__ import annotations

import json
from pathlib import Path

from rerank_dist.checkpoint import (TrainerState, latest_step_dir, prune_step_dirs, publish_best, reconcile_run,
                                    step_dirs)
from rerank_dist.io import read_json, write_json
from rerank_dist.paths import RunPaths


def _checkpoint(paths: RunPaths, step: int, best_step: int) -> Path:
    d = paths.step_dir(step)
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(f"weights of step {step}".encode())
    (d / "adapter_config.json").write_text("{}")
    write_json(d / "verbalizer.json", {"labels": ["A", "B"], "label_ids": [1, 2], "step": step})
    TrainerState(step=step, best_step=best_step, best_ndcg=0.1).write(d)
    return d


def _log(paths: RunPaths, steps: list[int]) -> None:
    paths.ranker.mkdir(parents=True, exist_ok=True)
    paths.train_log.write_text("".join(json.dumps({"step": s, "loss": 3.0}) + "\n" for s in steps)
                               + json.dumps({"step": 4, "event": "eval"}) + "\n")


def test_keep_last_k_never_drops_the_best_step(tmp_path):
    paths = RunPaths(tmp_path)
    for step in (2, 4, 6, 8, 10):
        _checkpoint(paths, step, best_step=4)
    (paths.ranker / "step-000012").mkdir()  # incomplete (no trainer_state.json): never counted or resumed
    assert prune_step_dirs(paths.ranker, keep_last=2, best_step=4) == [2, 6]
    assert sorted(step_dirs(paths.ranker)) == [4, 8, 10]
    assert latest_step_dir(paths.ranker).name == "step-000010"
    assert prune_step_dirs(paths.ranker, keep_last=0, best_step=4) == []  # 0 keeps all


def test_restart_publishes_the_best_that_was_killed_before_it_was_published(tmp_path):
    """A new best is saved as step-000006/ first and copied to best/ second: a kill in between leaves
    best/ at step 4 while the checkpoint the run restarts from says step 6 is the best."""
    paths = RunPaths(tmp_path)
    publish_best(_checkpoint(paths, 4, best_step=4), paths.best)
    six = _checkpoint(paths, 6, best_step=6)
    _log(paths, [1, 2, 3, 4, 5, 6])
    assert read_json(paths.best / "verbalizer.json")["step"] == 4  # the planted inconsistency
    assert reconcile_run(paths, TrainerState.read(six)) == ["best/ set to step 6's adapter (it held step 4)"]
    assert (paths.best / "adapter_model.safetensors").read_bytes() == b"weights of step 6"
    assert reconcile_run(paths, TrainerState.read(six)) == []  # consistent now: nothing more to do


def test_restart_from_an_older_checkpoint_drops_later_log_lines_and_best(tmp_path):
    """Restarting from step 4 (later checkpoints deleted by hand, say): the log keeps steps up to 4 and
    best/ goes back to the best of step 4's state."""
    paths = RunPaths(tmp_path)
    four = _checkpoint(paths, 4, best_step=4)
    publish_best(_checkpoint(paths, 6, best_step=6), paths.best)
    _log(paths, [1, 2, 3, 4, 5, 6])
    assert read_json(paths.best / "verbalizer.json")["step"] == 6
    assert len(reconcile_run(paths, TrainerState.read(four))) == 2
    assert [json.loads(line)["step"] for line in paths.train_log.read_text().splitlines()] == [1, 2, 3, 4, 4]
    assert (paths.best / "adapter_model.safetensors").read_bytes() == b"weights of step 4"


def test_a_fresh_start_clears_what_a_run_killed_before_its_first_checkpoint_left(tmp_path):
    paths = RunPaths(tmp_path)
    publish_best(_checkpoint(paths, 2, best_step=2), paths.best)
    _log(paths, [1, 2, 3])
    for d in step_dirs(paths.ranker).values():  # as if no checkpoint had survived
        import shutil

        shutil.rmtree(d)
    reconcile_run(paths, None)
    assert paths.train_log.read_text() == "" and not paths.best.exists()


def test_trainer_state_round_trip_is_plain_json(tmp_path):
    state = TrainerState(step=3, epoch=1, steps_in_epoch=2, best_ndcg=0.5, best_step=2, total_steps=9,
                         world_size=2, accumulation=4, scheduler={"last_epoch": 3, "base_lrs": [0.1]})
    state.write(tmp_path)
    assert json.loads((tmp_path / "trainer_state.json").read_text())["scheduler"]["last_epoch"] == 3
    assert TrainerState.read(tmp_path) == state


def _cut_log(paths: RunPaths, steps: list[int]) -> None:
    """The log of a run killed in the middle of appending its next line."""
    _log(paths, steps)
    with open(paths.train_log, "a") as f:
        f.write('{"step": %d, "loss": 2.9' % (steps[-1] + 1))
    last = paths.train_log.read_text().splitlines()[-1]
    try:  # precondition: the last line really is cut
        json.loads(last)
        raise AssertionError(f"planted line parses: {last}")
    except ValueError:
        pass


def test_restart_after_a_kill_mid_append_drops_the_cut_line(tmp_path):
    paths = RunPaths(tmp_path)
    four = _checkpoint(paths, 4, best_step=4)
    publish_best(four, paths.best)
    _cut_log(paths, [1, 2, 3, 4])
    changes = reconcile_run(paths, TrainerState.read(four))
    assert len(changes) == 1 and "cut" in changes[0] and "line 6" in changes[0], changes
    assert [json.loads(line)["step"] for line in paths.train_log.read_text().splitlines()] == [1, 2, 3, 4, 4]
    assert paths.train_log.read_text().endswith("\n")
    assert reconcile_run(paths, TrainerState.read(four)) == []  # consistent now


def test_a_fresh_start_after_a_kill_mid_append_clears_the_log(tmp_path):
    paths = RunPaths(tmp_path)
    _cut_log(paths, [1, 2])
    changes = reconcile_run(paths, None)
    assert paths.train_log.read_text() == ""
    assert any("cut" in c for c in changes), changes
