"""The doctor on runs it did not make: a Hugging Face Trainer / TRL output directory and a predictions file.

``build_trainer_run`` writes a synthetic TRL-style output directory (checkpoint-*/ with LoRA adapters,
trainer_state.json, a pickled TrainingArguments, a tokenizer) with the training examples, test
predictions and metrics beside it: healthy, or with any of the post-mortem's faults planted. Each
fault alone fails (or warns) exactly its own check; all of them together are the post-mortem run,
which the doctor diagnoses completely.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import string
from pathlib import Path

import numpy as np
import pytest

from rerank_dist.cli import main
from rerank_dist.doctor import DoctorOptions, Status, diagnose
from rerank_dist.doctor.readers.safe_pickle import read_training_args
from rerank_dist.prompts import ALPACA_SHORT, INSTRUCTION
from tests.tiny_tokenizers import TITLES, build_sentencepiece_like

LETTERS = string.ascii_uppercase
NUM_ITEMS = 3000
TEST_USERS = 610
TRAIN_EXAMPLES = 400
STEPS, LOG_EVERY, SAVE_EVERY = 500, 10, 100
HIT_RATE = 0.4  # the post-mortem's "Recall@20 = 0.4": targets among the 20 candidates
# Faults a build can plant; POSTMORTEM is the post-mortem run (with a Llama-2-style tokenizer).
FAULTS = {"never_saved", "no_eval", "noop_adapter", "loss_flat", "loss_above_chance", "loss_nan", "loss_plateau",
          "loss_prior", "val_rising", "train_k5", "recall_at_k", "unbalanced", "collapse", "prefers_last",
          "random_negatives", "standalone_ids", "noise_scores", "small_model"}
POSTMORTEM = frozenset({"never_saved", "no_eval", "loss_prior", "train_k5", "unbalanced", "random_negatives",
                        "recall_at_k", "collapse", "noise_scores", "small_model", "standalone_ids"})


# ---------------------------------------------------------------- the synthetic Trainer run


def _popularity() -> np.ndarray:
    weights = 1.0 / np.arange(1, NUM_ITEMS + 1) ** 1.1  # item 1 the most popular
    return weights / weights.sum()


def _popular(rng: np.random.Generator, n: int, exclude: set[int]) -> list[int]:
    """n distinct items drawn by popularity, as a retriever proposes them."""
    out: list[int] = []
    while len(out) < n:
        for item in rng.choice(NUM_ITEMS, size=4 * n, p=_popularity()) + 1:
            if int(item) not in exclude and int(item) not in out:
                out.append(int(item))
                if len(out) == n:
                    break
    return out


def _uniform(rng: np.random.Generator, n: int, exclude: set[int]) -> list[int]:
    """n distinct items drawn uniformly from the catalogue: LlamaRec's random negatives."""
    out: list[int] = []
    while len(out) < n:
        item = int(rng.integers(1, NUM_ITEMS + 1))
        if item not in exclude and item not in out:
            out.append(item)
    return out


def _title(item: int) -> str:
    return TITLES[item % len(TITLES)]


def _prompt(history: list[int], candidates: list[int]) -> str:
    text = ("User history:\n" + "\n".join(f"({i + 1}) {_title(h)}" for i, h in enumerate(history))
            + "\n\nCandidate pool:\n" + "\n".join(f"({LETTERS[i]}) {_title(c)}" for i, c in enumerate(candidates)))
    return ALPACA_SHORT.format(instruction=INSTRUCTION, input=text)


def _train_rows(rng: np.random.Generator, faults: frozenset[str]) -> list[dict]:
    k = 5 if "train_k5" in faults else 20
    rows = []
    for j in range(TRAIN_EXAMPLES):
        target = _popular(rng, 1, set())[0]
        draw = _uniform if "random_negatives" in faults else _popular
        negatives = draw(rng, k - 1, {target})
        if "unbalanced" in faults:  # 80% of the answers are "A"
            slot = 0 if rng.random() < 0.8 else int(rng.integers(1, k))
        else:
            slot = j % k  # every letter equally often
        candidates = negatives[:slot] + [target] + negatives[slot:]
        rows.append({"prompt": _prompt(_popular(rng, 3, {target}), candidates), "completion": LETTERS[slot],
                     "candidates": candidates, "target": target})
    return rows


def _prediction_rows(rng: np.random.Generator, faults: frozenset[str]) -> list[dict]:
    rows = []
    for user in range(1, TEST_USERS + 1):
        target = _popular(rng, 1, set())[0]
        present = rng.random() < HIT_RATE
        retrieved = _popular(rng, 19 if present else 20, {target})
        if present:  # the retriever puts the target high more often than not
            retrieved.insert(min(19, int(rng.geometric(0.08)) - 1), target)
        shown = [retrieved[i] for i in rng.permutation(20)]  # displayed shuffled, letters A..T
        scores = rng.normal(size=20)
        if present and "noise_scores" not in faults and rng.random() < 0.85:
            scores[shown.index(target)] += 4.0  # the reranker knows the answer most of the time
        if "collapse" in faults:
            scores[0] += 12.0  # "always A"
        if "prefers_last" in faults and rng.random() < 0.3:
            scores[19] += 6.0
        rows.append({"user": user, "candidates": shown, "scores": [round(float(s), 4) for s in scores],
                     "retriever_scores": [float(20 - retrieved.index(c)) for c in shown], "target": target})
    return rows


def _losses(steps: np.ndarray, faults: frozenset[str], prior: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(scale=0.02, size=len(steps))
    if "loss_flat" in faults:
        return 0.7 + noise
    if "loss_above_chance" in faults:  # still falling at the end, never below ln(20)
        return 3.9 - 0.8 * (steps - steps[0]) / (steps[-1] - steps[0]) + noise
    if "loss_plateau" in faults:  # below chance, then stuck well above a useful level
        return 2.8 + 1.1 * np.exp(-steps / 30) + noise
    if "loss_prior" in faults:  # falls, then sits at the entropy of the answer letters: "always A"
        return prior + 0.02 + 0.9 * np.exp(-steps / 60) + noise
    losses = 0.7 + 3.2 * np.exp(-steps / 80) + noise
    if "loss_nan" in faults:
        losses[20] = math.nan  # an fp16 overflow
    return losses


def _eval_losses(steps: list[int], faults: frozenset[str]) -> list[float]:
    if "val_rising" in faults:  # overfitting from step 200 on
        return [2.0, 1.2, 1.4, 1.7, 2.0][: len(steps)]
    return [round(0.75 + 2.9 * math.exp(-s / 80), 4) for s in steps]


def _write_adapter(directory: Path, seed: int, faults: frozenset[str]) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            base = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{base}.lora_A.weight"] = rng.normal(size=(4, 64)).astype(np.float32)
            b = np.zeros((64, 4)) if "noop_adapter" in faults else rng.normal(scale=0.01, size=(64, 4))
            tensors[f"{base}.lora_B.weight"] = b.astype(np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    base_model = "Qwen/Qwen3-0.6B" if "small_model" in faults else "meta-llama/Llama-2-7b-hf"
    (directory / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": base_model, "peft_type": "LORA", "r": 4 if "small_model" in faults else 16,
         "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}))


def _training_args(path: Path, faults: frozenset[str]) -> None:
    import torch
    from transformers import TrainingArguments

    evaluating = "no_eval" not in faults
    args = TrainingArguments(output_dir=str(path.parent), load_best_model_at_end="never_saved" not in faults,
                             eval_strategy="steps" if evaluating else "no", save_strategy="steps",
                             eval_steps=SAVE_EVERY, save_steps=SAVE_EVERY, logging_steps=LOG_EVERY,
                             metric_for_best_model="eval_loss" if evaluating else None,
                             per_device_train_batch_size=8, learning_rate=1e-4, report_to=[])
    torch.save(args, path)  # as Trainer does


def _in_context_ids(tokenizer, prompt: str, labels: list[str]) -> list[int]:
    from rerank_dist.verbalizer import resolve_label_ids

    return resolve_label_ids(tokenizer, prompt, labels)


def build_trainer_run(root: Path, faults: frozenset[str] = frozenset(), tokenizer=None, seed: int = 0) -> Path:
    """A TRL-style output directory at root (see the module docstring); returns root."""
    unknown = set(faults) - FAULTS
    assert not unknown, f"unknown faults {unknown}"
    faults = frozenset(faults)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = _train_rows(rng, faults)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _prediction_rows(rng, faults)))
    metrics = {"test_recall@5": 0.21, "test_ndcg@10": 0.17, "test_mrr@10": 0.14}
    if "recall_at_k" in faults:
        metrics["test_recall@20"] = HIT_RATE
    (root / "metrics.json").write_text(json.dumps(metrics))

    answers = np.array([LETTERS.index(r["completion"]) for r in rows])
    prior = -sum(p * math.log(p) for p in np.bincount(answers) / len(answers) if p > 0)
    steps = np.arange(LOG_EVERY, STEPS + 1, LOG_EVERY)
    losses = _losses(steps, faults, prior, rng)
    eval_steps = list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    evals = _eval_losses(eval_steps, faults) if "no_eval" not in faults else []
    best = eval_steps[int(np.argmin(evals))] if evals else None
    history: list[dict] = []
    for s, loss in zip(steps, losses):
        history.append({"step": int(s), "epoch": round(s / STEPS, 3), "loss": float(loss), "learning_rate": 1e-4})
        if evals and s % SAVE_EVERY == 0:
            history.append({"step": int(s), "epoch": round(s / STEPS, 3), "eval_loss": evals[eval_steps.index(s)]})

    labels = list(LETTERS[: len(rows[0]["candidates"])])
    scored_ids = None
    if tokenizer is not None:
        in_context = _in_context_ids(tokenizer, rows[0]["prompt"], labels)
        scored_ids = in_context
        if "standalone_ids" in faults:  # the letter tokenised alone ("▁A" / "ĠA"), not as it follows the prompt
            prefix = "" if tokenizer("A", add_special_tokens=False)["input_ids"] != in_context[:1] else " "
            scored_ids = [tokenizer(prefix + lab, add_special_tokens=False)["input_ids"][-1] for lab in labels]
            assert scored_ids != in_context
    for s in eval_steps:
        ckpt = root / f"checkpoint-{s}"
        ckpt.mkdir()
        _write_adapter(ckpt, seed + s, faults)
        state = {"global_step": s, "max_steps": STEPS, "log_history": [h for h in history if h["step"] <= s],
                 "best_model_checkpoint": str(root / f"checkpoint-{best}") if best and best <= s else None,
                 "best_metric": min(evals[: eval_steps.index(s) + 1]) if evals else None}
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        _training_args(ckpt / "training_args.bin", faults)
        if tokenizer is not None:
            tokenizer.save_pretrained(ckpt)
    if scored_ids is not None:
        (root / "verbalizer.json").write_text(json.dumps({"labels": labels, "label_ids": scored_ids}))
    if "never_saved" not in faults:  # trainer.save_model() and save_state() after train()
        source = root / f"checkpoint-{best or STEPS}"
        for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "training_args.bin"):
            shutil.copy2(source / name, root / name)
        (root / "trainer_state.json").write_text(json.dumps({**json.loads((source / "trainer_state.json").read_text()),
                                                             "global_step": STEPS, "log_history": history}))
        if tokenizer is not None:
            tokenizer.save_pretrained(root)
    return root


def statuses(target: Path, **options) -> dict[str, Status]:
    report, _ = diagnose(target, DoctorOptions(**options))
    return {r.id: r.status for r in report.results}


def changed(before: dict[str, Status], after: dict[str, Status]) -> dict[str, Status]:
    return {k: v for k, v in after.items() if before[k] != v}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, bpe) -> tuple[Path, dict[str, Status]]:
    root = build_trainer_run(tmp_path_factory.mktemp("hf") / "out", tokenizer=bpe)
    return root, statuses(root)


def test_a_healthy_trainer_run_passes_every_check_it_has_inputs_for(healthy):
    root, found = healthy
    found = dict(found)
    assert found.pop("scores_reproduce") is Status.SKIP  # re-scoring needs a rerank_dist run
    assert set(found.values()) == {Status.PASS}, found


# Each of the post-mortem's faults alone, planted in the healthy run: its own check, and no other, changes.
DIAGONAL = {
    "never_saved": ("best_weights_scored", Status.FAIL),
    "noop_adapter": ("adapter_not_noop", Status.FAIL),
    "loss_flat": ("loss_falling", Status.FAIL),
    "loss_above_chance": ("loss_below_chance", Status.FAIL),
    "loss_nan": ("loss_stable", Status.FAIL),
    "val_rising": ("val_vs_train", Status.FAIL),
    "loss_plateau": ("capacity", Status.WARN),
    "train_k5": ("candidate_counts", Status.FAIL),
    "recall_at_k": ("metric_k", Status.FAIL),
    "unbalanced": ("answer_balance", Status.FAIL),
    "collapse": ("predicted_letters", Status.FAIL),
    "random_negatives": ("negatives_match", Status.FAIL),
    "standalone_ids": ("verbalizer", Status.FAIL),
    "noise_scores": ("reranker_vs_baselines", Status.FAIL),
}


def _fault_is_there(root: Path, fault: str) -> None:
    """The planted fault, read straight from the files it was planted in."""
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    preds = [json.loads(line) for line in (root / "predictions.jsonl").read_text().splitlines()]
    state = json.loads((root / "checkpoint-500" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    if fault == "never_saved":
        assert not (root / "adapter_model.safetensors").exists()
        assert read_training_args(root / "checkpoint-500" / "training_args.bin")["load_best_model_at_end"] is False
    elif fault == "noop_adapter":
        from safetensors.numpy import load_file

        weights = load_file(str(root / "adapter_model.safetensors"))
        assert all(not v.any() for k, v in weights.items() if "lora_B" in k)
    elif fault == "loss_flat":
        assert abs(np.mean(losses[:10]) - np.mean(losses[-10:])) < 0.02
    elif fault == "loss_above_chance":
        assert min(losses) > math.log(20)
    elif fault == "loss_nan":
        assert any(math.isnan(x) for x in losses)
    elif fault == "val_rising":
        assert evals[-1] > min(evals) * 1.5 and losses[-1] < losses[0]
    elif fault == "loss_plateau":
        assert math.log(20) * 0.85 < np.mean(losses[-10:]) < math.log(20)
        assert abs(np.mean(losses[-20:-10]) - np.mean(losses[-10:])) < 0.02
    elif fault == "train_k5":
        assert {len(r["candidates"]) for r in rows} == {5} and {len(p["candidates"]) for p in preds} == {20}
    elif fault == "recall_at_k":
        assert "test_recall@20" in json.loads((root / "metrics.json").read_text())
    elif fault == "unbalanced":
        assert sum(r["completion"] == "A" for r in rows) / len(rows) > 0.75
    elif fault == "collapse":
        assert all(int(np.argmax(p["scores"])) == 0 for p in preds)
    elif fault == "random_negatives":
        negatives = [c for r in rows for c in r["candidates"] if c != r["target"]]
        assert np.median(negatives) > NUM_ITEMS / 4  # uniform over the catalogue, not popular items
    elif fault == "standalone_ids":
        assert json.loads((root / "verbalizer.json").read_text())["label_ids"][0] != 36  # 36: "A" after the prompt
    elif fault == "noise_scores":
        hits = [int(np.argmax(p["scores"])) == p["candidates"].index(p["target"]) for p in preds
                if p["target"] in p["candidates"]]
        assert np.mean(hits) < 0.15


@pytest.mark.parametrize("fault", sorted(DIAGONAL))
def test_each_postmortem_fault_alone_trips_exactly_its_own_check(healthy, tmp_path, bpe, fault):
    _, clean = healthy
    root = build_trainer_run(tmp_path / "out", frozenset({fault}), tokenizer=bpe)
    _fault_is_there(root, fault)
    check, expected = DIAGONAL[fault]
    assert clean[check] is Status.PASS
    assert changed(clean, statuses(root)) == {check: expected}


def test_the_postmortem_run_is_diagnosed_completely(tmp_path):
    """TRL-style run: no best model saved (load_best_model_at_end=False), loss stuck at the answer prior, 5
    candidates in training vs 20 at test, 80% "A", random negatives, Recall@20 over 20, a 0.6B backbone,
    letters scored as "▁A" while training taught "A"."""
    spm = build_sentencepiece_like(tmp_path / "spm")
    root = build_trainer_run(tmp_path / "out", POSTMORTEM, tokenizer=spm)
    for fault in POSTMORTEM - {"no_eval", "small_model", "loss_prior"}:
        _fault_is_there(root, fault)
    report, _ = diagnose(root, DoctorOptions())
    found = {r.id: r.status for r in report.results}
    assert found == {
        "best_weights_scored": Status.FAIL, "scores_reproduce": Status.SKIP, "adapter_not_noop": Status.PASS,
        "loss_falling": Status.PASS, "loss_below_chance": Status.FAIL, "loss_stable": Status.PASS,
        "val_vs_train": Status.SKIP, "capacity": Status.WARN, "candidate_counts": Status.FAIL,
        "metric_k": Status.FAIL, "answer_balance": Status.FAIL, "predicted_letters": Status.FAIL,
        "negatives_match": Status.FAIL, "verbalizer": Status.FAIL, "reranker_vs_baselines": Status.FAIL}
    by_id = report.by_id()
    assert "load_best_model_at_end=False" in by_id["best_weights_scored"].value
    assert "entropy of the training answers" in by_id["loss_below_chance"].value
    assert "0.6B" in by_id["capacity"].value and "train 5" in by_id["candidate_counts"].value
    assert "test_recall@20" in by_id["metric_k"].value
    assert "'A'" in by_id["answer_balance"].value and "'A' (first)" in by_id["predicted_letters"].value
    assert "▁A" in " ".join([by_id["verbalizer"].value] + by_id["verbalizer"].details)
    assert "not distinguishable from random" in by_id["reranker_vs_baselines"].value
    assert report.exit_code == 2


def test_exit_status_is_0_1_2_for_pass_warnings_failures(tmp_path, bpe, capsys):
    """A predictions file with its training examples and metrics beside it; CI gates on the status."""
    for name, faults, code in (("ok", frozenset(), 0), ("warn", frozenset({"prefers_last"}), 1),
                               ("fail", frozenset({"collapse"}), 2)):
        root = build_trainer_run(tmp_path / name, faults, tokenizer=bpe)
        assert main(["doctor", str(root / "predictions.jsonl"), "--no-plots"]) == code
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"rerank-dist doctor: {root / 'predictions.jsonl'} (predictions file)")
        assert len(out) == 2 + 15 and out[-1].endswith(f"(exit {code})")


def test_outputs_are_written_to_out(tmp_path, bpe):
    root = build_trainer_run(tmp_path / "run", POSTMORTEM, tokenizer=bpe)
    out = tmp_path / "report"
    assert main(["doctor", str(root), "--out", str(out)]) == 2
    assert {p.name for p in out.iterdir()} == {"doctor.json", "doctor.md", "doctor_loss.png", "doctor_letters.png"}
    data = json.loads((out / "doctor.json").read_text())
    assert data["kind"] == "hf_trainer" and data["exit_code"] == 2 and len(data["checks"]) == 15
    assert "| FAIL | `answer_balance` |" in (out / "doctor.md").read_text()
    assert not list(root.glob("doctor*"))  # nothing written into the run itself


def test_columns_found_by_name_or_given_by_flag(tmp_path, capsys):
    """A CSV with list cells as text, a ranked list instead of scores, and unusual column names."""
    rng = np.random.default_rng(1)
    lines = ["uid,shown,my_ranking,truth"]
    for u in range(200):
        shown = _popular(rng, 10, set())
        target = shown[int(rng.integers(10))]
        ranking = [target] + [c for c in shown if c != target]  # a perfect reranker
        lines.append(f'{u},"{json.dumps(shown)}","{" ".join(map(str, ranking))}",{target}')
    path = tmp_path / "preds.csv"
    path.write_text("\n".join(lines) + "\n")
    assert main(["doctor", str(path), "--no-plots"]) == 2
    assert "error: " in capsys.readouterr().err  # no target column it can recognise
    code = main(["doctor", str(path), "--no-plots", "--column", "candidates=shown", "--column", "ranked=my_ranking",
                 "--column", "target=truth", "--retriever-order", "given"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS  reranker_vs_baselines" in out and "NDCG@10 reranker 1.0000" in out


def test_an_unreadable_input_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["doctor", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file or directory" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["doctor", str(tmp_path / "empty")]) == 2
    assert "no run found" in capsys.readouterr().err


def test_a_run_missing_inputs_skips_checks_and_names_what_they_need(tmp_path, bpe):
    root = build_trainer_run(tmp_path / "out", tokenizer=bpe)
    for name in ("train.jsonl", "predictions.jsonl", "metrics.json"):
        (root / name).unlink()
    report, _ = diagnose(root, DoctorOptions())
    skips = {r.id: r.value for r in report.results if r.status is Status.SKIP}
    assert set(skips) >= {"answer_balance", "predicted_letters", "negatives_match", "metric_k", "candidate_counts",
                          "reranker_vs_baselines"}
    assert "--train-file" in skips["answer_balance"] and "--predictions" in skips["reranker_vs_baselines"]
    assert report.by_id()["best_weights_scored"].status is Status.PASS


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_training_args_are_read_without_running_the_pickle(tmp_path):
    """A training_args.bin is a pickle: reading it must not import or call what it names."""
    _Boom.marker = str(tmp_path / "executed")
    path = tmp_path / "training_args.bin"
    path.write_bytes(pickle.dumps({"load_best_model_at_end": False, "payload": _Boom()}))
    fields = read_training_args(path)
    assert fields["load_best_model_at_end"] is False
    assert not (tmp_path / "executed").exists()


# ---------------------------------------------------------------- prompt layouts

POOL = ["Alien (1979)", "Fargo (1996)", "Big (1988)", "Heat (1995)", "Jaws (1975)"]


def _llamarec_prompt(history: list[str], pool: list[str]) -> str:
    """LlamaRec's own layout (alpaca_short around its llm_input_template 'User history: {}; \\n Candidate pool: {}',
    items joined by ' \\n '): the first candidate follows "Candidate pool:" on the same line."""
    seq = " \n ".join(f"({i + 1}) {t}" for i, t in enumerate(history))
    cands = " \n ".join(f"({LETTERS[i]}) {t}" for i, t in enumerate(pool))
    return ALPACA_SHORT.format(instruction=INSTRUCTION, input=f"User history: {seq}; \n Candidate pool: {cands}")


def _ours_prompt(history: list[str], pool: list[str]) -> str:
    text = ("User history:\n" + "\n".join(f"({i + 1}) {t}" for i, t in enumerate(history))
            + "\n\nCandidate pool:\n" + "\n".join(f"({LETTERS[i]}) {t}" for i, t in enumerate(pool)))
    return ALPACA_SHORT.format(instruction=INSTRUCTION, input=text)


def _chatml_prompt(history: list[str], pool: list[str]) -> str:
    """A chat template's rendering (ChatML), the pool inline after its section name as LlamaRec writes it."""
    user = (f"User history: {'; '.join(history)}\nCandidate pool: "
            + "\n".join(f"({LETTERS[i]}) {t}" for i, t in enumerate(pool)))
    return (f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def _llama2_chat_prompt(history: list[str], pool: list[str]) -> str:
    user = (f"User history: {'; '.join(history)}\n\nCandidate pool: "
            + " \n ".join(f"({LETTERS[i]}) {t}" for i, t in enumerate(pool)))
    return f"<s>[INST] <<SYS>>\n{INSTRUCTION}\n<</SYS>>\n\n{user} [/INST] "


@pytest.mark.parametrize("layout", [_llamarec_prompt, _ours_prompt, _chatml_prompt, _llama2_chat_prompt])
def test_training_prompts_in_each_layout_show_all_their_candidates(tmp_path, layout):
    """5 candidates A-E whatever the layout: candidate_counts and the verbalizer read K and the labels from them."""
    from rerank_dist.doctor.readers.tables import read_training_file

    rows = [{"prompt": layout(["Toy Story (1995)", "Heat (1995)"], POOL), "completion": LETTERS[j % 5]}
            for j in range(10)]
    prompt = rows[0]["prompt"]
    assert all(f"({c}) {t}" in prompt for c, t in zip("ABCDE", POOL))  # precondition: 5 lettered candidates
    if layout is _llamarec_prompt:  # precondition: the first one on the section's line, as LlamaRec writes it
        assert "Candidate pool: (A) Alien" in prompt
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    training = read_training_file(path)
    assert training.labels == list("ABCDE")
    assert dict(training.side.k_counts) == {5: 10}
    assert training.side.label_counts == {c: 2 for c in "ABCDE"}


def test_a_stray_lettered_line_neither_adds_a_candidate_nor_hides_the_pool(tmp_path):
    from rerank_dist.doctor.readers.tables import _letters_in

    prompt = ("Rules:\nA. answer with one letter\nB) nothing else\n"
              + _llamarec_prompt(["Toy Story (1995)", "Mission: (A) Plan"], ["Alien: A. Story", *POOL[1:]]))
    assert "\nA. answer" in prompt  # precondition: lettered lines outside the pool, before it
    assert "(A) Alien: A. Story \n (B) Fargo" in prompt  # and a title in the pool that looks like an option
    assert _letters_in(prompt) == list("ABCDE")
