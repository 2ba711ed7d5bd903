"""The GPU kit's table script (bench/gpu_table.py) on a small fake output folder: no GPU needed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_table():
    spec = importlib.util.spec_from_file_location("gpu_table", ROOT / "bench" / "gpu_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB, 550.54\ntorch 2.13\n")
    (out / "model_config.json").write_text((ROOT / "configs" / "models" / "qwen3-4b" / "config.json").read_text())
    rows = {"ours": ("ok", "", {"tokens_per_s": 3000.0, "peak_memory_gib": 20.0, "padding_share": 0.05,
                                "memory_options": {"gradient_checkpointing": "true", "quantization": "nf4"},
                                "loss_first_steps": 3.0, "loss_last_steps": 2.9, "steps": 5}),
            "trl": ("ok", "", {"tokens_per_s": 1500.0, "peak_memory_gib": 25.0, "gradient_checkpointing": True,
                               "quantization": "nf4", "loss_first_steps": 9.0, "loss_last_steps": 8.0}),
            "ckpt_auto": ("ok", "model.gradient_checkpointing=auto",
                          {"tokens_per_s": 4000.0, "peak_memory_gib": 40.0,
                           "memory_options": {"gradient_checkpointing": "false", "quantization": "nf4"}}),
            "fsdp": ("failed", "train.backend=fsdp", None),
            "compile": ("skipped", "model.compile=inductor", None)}
    for name, (status, args, summary) in rows.items():
        (out / f"{name}.status").write_text(status + (" exit 1" if status == "failed" else ""))
        (out / f"{name}.args").write_text(args)
        if summary is not None:
            (out / f"{name}.summary.json").write_text(json.dumps(summary))
    (out / "score_merged.status").write_text("ok")
    (out / "score_merged.args").write_text("score.merged_weights=true")
    (out / "score_merged.metrics.json").write_text(json.dumps(
        {"prompts_per_second": 61.5, "peak_memory_gib": 9.1, "reranker": {"num_users": 320, "all_users": {"ndcg@10": 0.1}}}))
    (out / "rows.txt").write_text("\n".join([*rows, "score_merged"]) + "\n")
    return out


def test_the_table_computes_ratios_to_trl_and_mfu_from_a_fake_kit_output(gpu_table, tmp_path):
    out = _fake_out(tmp_path)
    assert gpu_table.main([str(out), "--dest", str(tmp_path / "dest")]) == 0
    result = json.loads((tmp_path / "dest" / "gpu.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    n = result["decoder_params"]
    assert 3.5e9 < n < 3.7e9  # Qwen3-4B's 36 decoder layers, without the 0.39e9 embedding
    assert result["peak_bf16_tflops"] == 989.4  # "H100 80GB HBM3" is the SXM part
    assert rows["ours"]["vs_trl_tokens_per_s"] == 2.0 and rows["ours"]["vs_trl_peak_memory"] == 0.8
    assert rows["ours"]["flops_per_token"] == "6N" and rows["ckpt_auto"]["flops_per_token"] == "4N"
    assert rows["ours"]["mfu"] == pytest.approx(3000 * 6 * n / 989.4e12, abs=1e-4)
    assert rows["ckpt_auto"]["mfu"] == pytest.approx(4000 * 4 * n / 989.4e12, abs=1e-4)
    assert rows["fsdp"]["status"] == "failed" and "tokens_per_s" not in rows["fsdp"]
    assert rows["score_merged"]["prompts_per_s"] == 61.5
    md = (tmp_path / "dest" / "gpu.md").read_text()
    assert "| ours | - | ok | 3,000 | 2.00 |" in md
    assert "| compile | model.compile=inductor | skipped |" in md
    assert "| score_merged | score.merged_weights=true | ok | 61.5 |" in md


def test_merged_scores_are_compared_with_the_4_bit_ones_user_by_user(gpu_table, tmp_path):
    """score_nf4 and score_merged leave their rankings: the table states how far the merged scores
    moved, matching users by id (the two files list them in different orders)."""
    import numpy as np
    import pandas as pd

    out = _fake_out(tmp_path)
    rng = np.random.default_rng(0)
    users, k = 6, 5
    scores = rng.normal(size=(users, k)).astype(np.float32)
    moved = scores.copy()
    moved[2, 0] += 0.25                                  # a small change to user 2
    moved[4] = scores[4][::-1]                           # user 4's order reversed
    order = [np.argsort(-r, kind="stable") for r in (scores, moved)]
    same = [bool((order[0][u] == order[1][u]).all()) for u in range(users)]
    assert not same[4] and sum(same) >= 4  # the precondition: one planted reordering at least
    for name, s, idx in (("score_nf4", scores, range(users)), ("score_merged", moved, reversed(range(users)))):
        (out / f"{name}.status").write_text("ok")
        pd.DataFrame([{"user": u, "prefix_len": 10 + u, "candidates": np.arange(k) + 100 * u, "scores": s[u]}
                      for u in idx]).to_parquet(out / f"{name}.rankings.parquet")
    assert gpu_table.main([str(out), "--dest", str(tmp_path / "dest")]) == 0
    diff = json.loads((tmp_path / "dest" / "gpu.json").read_text())["merged_vs_nf4"]
    assert diff["users"] == users
    assert diff["max_abs_score_diff"] == pytest.approx(float(np.abs(scores - moved).max()))
    assert diff["mean_abs_score_diff"] == pytest.approx(float(np.abs(scores - moved).mean()), rel=1e-6)
    assert diff["same_order_share"] == pytest.approx(sum(same) / users)
    assert "Merged 16-bit weights against 4-bit + adapter, the same 6 users" in (tmp_path / "dest" / "gpu.md").read_text()
    # Different prompts are refused, not compared.
    other = pd.read_parquet(out / "score_merged.rankings.parquet")
    other.at[0, "candidates"] = other.at[0, "candidates"][::-1]
    other.to_parquet(out / "score_merged.rankings.parquet")
    with pytest.raises(ValueError, match="candidate lists differ"):
        gpu_table.collect(out)


def test_the_table_refuses_a_folder_that_is_not_the_kits(gpu_table, tmp_path, capsys):
    assert gpu_table.main([str(tmp_path)]) == 2
    assert "rows.txt: not found" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()
