"""Bad input through the command line: one line per problem on stderr, exit status 2, nothing half-written."""

import subprocess
import sys
from pathlib import Path

from rerank_dist.cli import main


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


def test_score_before_train_names_the_missing_adapter(tmp_path, capsys):
    code = main(["score", f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "adapter_model.safetensors" in err and "train" in err


def test_console_script_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rerank_dist.cli", "config", "train.epochs=0"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "error: train.epochs: expected > 0, got 0"
