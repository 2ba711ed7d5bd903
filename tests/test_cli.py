"""Bad input through the command line: one line per problem on stderr, exit status 2, nothing half-written."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rerank_dist import pipeline
from rerank_dist.cli import main
from rerank_dist.settings import load_config
from rerank_dist.data import prepare as data_prepare
from rerank_dist.data.prepare import load_dataset


def test_local_source_with_missing_directory(tmp_path, capsys):
    code = main(["prepare", f"run_dir={tmp_path / 'run'}", "data.source=local", f"data.raw_dir={tmp_path / 'nope'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(tmp_path / "nope") in err[0]
    assert not (tmp_path / "run" / "data" / "meta.json").exists()


def test_corrupt_ratings_file(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    (raw / "ratings.csv").write_text("userId,movieId\n1,1\n")  # rating and timestamp columns missing
    code = main(["prepare", f"run_dir={tmp_path / 'run'}", "data.source=local", f"data.raw_dir={raw}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ratings.csv" in err[0] and "timestamp" in err[0]
    assert not list((tmp_path / "run").rglob("*.parquet"))


def _local_raw(root: Path) -> Path:
    """Users 1-4 rate movies 1-4; user 5 also rates movie 9, which no one else does (data.min_count=2 drops it)."""
    root.mkdir()
    ratings = [(u, m, m) for u in range(1, 5) for m in range(1, 5)] + [(5, m, m) for m in (1, 2, 3, 9)]
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                      + "".join(f"{u},{m},4.0,{t}\n" for u, m, t in ratings))
    (root / "movies.csv").write_text("movieId,title,genres\n"
                                     + "".join(f"{m},Movie {m} (2000),Drama\n" for m in (1, 2, 3, 4, 9)))
    return root


# The outputs of `prepare`, in the order they are written: the data files, then the stage marker.
PREPARE_WRITES = ["items.parquet", "sequences.parquet", "meta.json", pipeline.MARKER]


@pytest.mark.parametrize("failing", PREPARE_WRITES[1:])
def test_prepare_failing_after_it_began_writing_leaves_nothing_to_trust(tmp_path, monkeypatch, capsys, failing):
    """A rerun of prepare with a changed config fails while writing its outputs (after at least one was
    written): afterwards no stage marker may vouch for files it was not written with, no meta.json may
    stand beside a missing or stale parquet, and the previous complete set stays usable."""
    run, data_dir = tmp_path / "run", tmp_path / "run" / "data"
    common = [f"run_dir={run}", "data.source=local", f"data.raw_dir={_local_raw(tmp_path / 'raw')}",
              f"model.cache_dir={tmp_path / 'cache'}"]
    old, new = common + ["data.min_count=1"], common + ["data.min_count=2"]
    assert main(["prepare", *old]) == 0  # an earlier, complete run
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    assert sorted(before) == sorted(PREPARE_WRITES) and data_prepare.STAGE_MARKER == pipeline.MARKER

    finished: list[str] = []  # outputs whose write completed before the injected failure

    def failing_at(real):
        def write(path, obj):
            if Path(path).name == failing:
                raise OSError(f"disk full while writing {failing}")
            real(path, obj)
            assert Path(path).is_file()
            finished.append(Path(path).name)
        return write

    monkeypatch.setattr(data_prepare, "write_parquet", failing_at(data_prepare.write_parquet))
    monkeypatch.setattr(data_prepare, "write_json", failing_at(data_prepare.write_json))
    monkeypatch.setattr(pipeline, "write_json", failing_at(pipeline.write_json))  # the stage marker
    with pytest.raises(OSError, match=f"disk full while writing {failing}"):
        main(["prepare", *new])
    monkeypatch.undo()
    # Precondition: the failure came after the outputs before it had been written in full.
    assert finished == PREPARE_WRITES[:PREPARE_WRITES.index(failing)] and finished

    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temp directory left behind
    cfg_old, cfg_new = load_config(None, old), load_config(None, new)
    assert not pipeline.stage_done(cfg_new, "prepare")  # the failed prepare must be redone
    for cfg in (cfg_old, cfg_new):
        if pipeline.stage_done(cfg, "prepare"):  # what the marker vouches for is what is there, complete
            assert load_dataset(data_dir).meta["config"] == dataclasses.asdict(cfg.data)
    if failing == pipeline.MARKER:
        # The new files are complete, but no marker vouches for them: the next run redoes prepare.
        assert not (data_dir / pipeline.MARKER).exists() and load_dataset(data_dir).num_items == 4
    else:
        assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before  # the old set, untouched
        capsys.readouterr()
        assert main(["prepare", *old]) == 0 and "[prepare] up to date" in capsys.readouterr().out
        assert load_dataset(data_dir).num_items == 5
    assert main(["prepare", *new]) == 0 and pipeline.stage_done(cfg_new, "prepare")
    assert load_dataset(data_dir).num_items == 4 and load_dataset(data_dir).meta["min_count"] == 2


def test_score_before_train_names_the_missing_adapter(tmp_path, capsys):
    code = main(["score", f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "adapter_model.safetensors" in err and "train" in err


def test_console_script_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rerank_dist.cli", "config", "train.epochs=0"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "error: train.epochs: expected > 0, got 0"
