"""The checks: each reads the Evidence (never a file) and returns one CheckResult.

Every check names the number behind its verdict and, unless it passed, the fix. Thresholds are
module constants with the reason for each; a check whose evidence is missing is skipped with the
input it needs (``Evidence.missing`` says where that input comes from for this kind of run).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from rerank_dist.doctor import stats
from rerank_dist.doctor.evidence import Evidence
from rerank_dist.doctor.result import CheckResult, Status, skipped
from rerank_dist.metrics import ORDER_INVARIANT

# A loss that falls by less than this (first vs last window) is flat; by less than WARN, barely moving.
LOSS_FLAT = 0.01
LOSS_SLOW = 0.05
# A smoothed loss that ends this much above its lowest point (relative and absolute) is diverging.
DIVERGE_REL, DIVERGE_ABS = 0.25, 0.3
# Plateau: the last quarter of the curve is less than this much below the quarter before it.
PLATEAU_REL = 0.03
# A plateau above this share of chance is a capacity problem: a 20-way reranker that learned
# something ends around 1.5-2.5 nats (0.5-0.83 of ln 20), LlamaRec's range.
CAPACITY_SHARE = 0.85
CAPACITY_MIN_POINTS = 8
# Scores that differ from the base model's by no more than this come from a no-op adapter.
NOOP_TOL = 1e-6
# Reloaded scores agreeing on the first choice this often are rounding, not other weights.
SAME_CHOICE = 0.9
# Letter distributions: one letter taking this share of first choices is a collapse.
COLLAPSE_SHARE = 0.5
P_FAIL, P_WARN = 1e-3, 1e-2
# Popularity divergence (Jensen-Shannon, bits) between training negatives and evaluation candidates.
JS_WARN, JS_FAIL = 0.1, 0.25
# Too few users with the target among their candidates make every comparison noise.
MIN_RETRIEVED = 20
NDCG_K = 10


def _mode(counter: Counter) -> int:
    return counter.most_common(1)[0][0]


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if abs(x) >= 0.1 else f"{100 * x:.1f}%"


# ---------------------------------------------------------------- weights


def best_weights_scored(ev: Evidence) -> CheckResult:
    cid, title = "best_weights_scored", "the scored weights are the saved best weights"
    lin = ev.lineage
    if lin is None:
        return skipped(cid, title, ev.needs("lineage", "a training record (train_summary.json / trainer_state.json)"))
    fails: list[str] = []
    warns: list[str] = []
    fix = ""
    if lin.final_saved is False:
        if lin.load_best_at_end is True:
            fails.append("load_best_model_at_end=True but no weights at the output directory's root: the best "
                         "model was loaded in memory and never saved")
        else:
            lb = "load_best_model_at_end=False" if lin.load_best_at_end is False else "load_best_model_at_end unknown"
            fails.append(f"no trained weights at the output directory's root (save_model never ran), {lb}: a scorer "
                         f"that loads this directory or the base model scores an untrained model")
        fix = ("set load_best_model_at_end=True (eval_strategy = save_strategy, metric_for_best_model), call "
               "trainer.save_model() after train(), and score the directory it writes")
    for a, b in lin.must_match:
        ha, hb = lin.hashes.get(a), lin.hashes.get(b)
        if ha and hb and ha != hb:
            fails.append(f"{a} sha256 {ha[:12]} != {b} sha256 {hb[:12]}")
            fix = fix or "rebuild the best weights from the best checkpoint and score again (rerank-dist score)"
    if lin.best_step is not None and lin.scored_step is not None and lin.scored_step != lin.best_step:
        fails.append(f"scores were made with step {lin.scored_step}, validation chose step {lin.best_step}")
        fix = fix or "score the best weights again (rerank-dist score reloads ranker/best/)"
    if lin.best_step is not None and lin.saved_step is not None and lin.saved_step != lin.best_step:
        fails.append(f"the saved best weights are step {lin.saved_step}, validation chose step {lin.best_step}")
        fix = fix or "rebuild best/ from the best step's checkpoint, then score again"
    if lin.scored_path and lin.expected_scored_path and lin.scored_path != lin.expected_scored_path:
        fails.append(f"scores name {lin.scored_path}, not the best weights {lin.expected_scored_path}")
        fix = fix or "score the best weights (rerank-dist score)"
    if (lin.final_saved and lin.load_best_at_end is False and lin.best_step is not None
            and lin.last_step is not None and lin.best_step != lin.last_step):
        warns.append(f"the final weights (step {lin.last_step}) were saved, validation preferred step {lin.best_step} "
                     f"(load_best_model_at_end=False)")
    if lin.evaluated is False and lin.final_saved is not False:
        warns.append("no evaluation ran during training, so nothing chose the best weights")
    numbers = {"best_step": lin.best_step, "saved_step": lin.saved_step, "scored_step": lin.scored_step,
               "last_step": lin.last_step, "final_saved": lin.final_saved, "load_best_at_end": lin.load_best_at_end,
               "hashes": lin.hashes}
    details = [f"{k}: sha256 {v}" for k, v in lin.hashes.items()] + lin.notes
    if fails:
        return CheckResult(cid, title, Status.FAIL, "; ".join(fails), fix, details, numbers)
    if warns:
        return CheckResult(cid, title, Status.WARN, "; ".join(warns),
                           "evaluate during training and set load_best_model_at_end=True (or score the best "
                           "checkpoint)", details, numbers)
    parts = []
    if lin.scored_step is not None:
        parts.append(f"scored step {lin.scored_step} = best step {lin.best_step}")
    elif lin.best_step is not None:
        parts.append(f"best step {lin.best_step}")
    if lin.load_best_at_end is not None:
        parts.append(f"load_best_model_at_end={lin.load_best_at_end}")
    for a, b in lin.must_match:
        if lin.hashes.get(a) and lin.hashes.get(b):
            parts.append(f"{a} sha256 {lin.hashes[a][:12]} = {b}")
    return CheckResult(cid, title, Status.PASS, "; ".join(parts) or "consistent", "", details, numbers)


def scores_reproduce(ev: Evidence) -> CheckResult:
    cid, title = "scores_reproduce", "reloading the saved weights reproduces the recorded scores"
    p = ev.probe
    if p is None:
        return skipped(cid, title, ev.needs("probe", "a rerank_dist run whose model can be loaded"))
    numbers = {"prompts": p.prompts, "batches": p.batches, "max_abs_diff": p.max_abs_diff,
               "top1_agreement": p.top1_agreement, "tolerance": p.tolerance, "candidates_match": p.candidates_match,
               "dtype": p.dtype, "device": p.device}
    batches = f"{p.batches} scorer batch{'es' if p.batches != 1 else ''}"
    where = f"over {p.prompts} prompts ({batches}, {p.dtype} on {p.device})"
    if not p.candidates_match:
        return CheckResult(cid, title, Status.FAIL, f"the rebuilt prompts show other candidates than the recorded "
                           f"rankings {where}", "the data, candidates or prompt settings changed after scoring: "
                           "run `rerank-dist score` again", numbers=numbers)
    value = (f"max |reloaded - recorded| = {p.max_abs_diff:.2e} {where}; tolerance {p.tolerance:.0e}; "
             f"same first choice {_pct(p.top1_agreement)}")
    if p.max_abs_diff <= p.tolerance:
        return CheckResult(cid, title, Status.PASS, value, numbers=numbers)
    if p.top1_agreement >= SAME_CHOICE:
        return CheckResult(cid, title, Status.WARN, value, "the same weights on other hardware or kernels round "
                           "differently; if this is the machine that scored, score again", numbers=numbers)
    return CheckResult(cid, title, Status.FAIL, value, "the weights on disk did not make these scores (overwritten "
                       "or another adapter scored): run `rerank-dist score` so the rankings come from the saved "
                       "best weights", numbers=numbers)


def adapter_not_noop(ev: Evidence) -> CheckResult:
    cid, title = "adapter_not_noop", "the adapter changes the model"
    a, p = ev.adapter, ev.probe
    if a is None and p is None:
        return skipped(cid, title, ev.needs("adapter", "a LoRA adapter (adapter_model.safetensors)"))
    fix = ("the adapter was never trained or its untrained initialisation was saved: check that the optimizer "
           "holds the LoRA weights and the learning rate is not 0, then save and score the trained adapter")
    numbers: dict = {}
    parts: list[str] = []
    status = Status.PASS
    if a is not None:
        numbers.update(adapter=a.path, lora_b=a.num_b, zero_lora_b=a.num_zero_b, max_abs_b=a.max_abs_b)
        if a.num_b == 0:
            parts.append(f"{a.path}: no LoRA B matrices")
            status = Status.FAIL
        else:
            where = "/".join(Path(a.path).parts[-2:])
            parts.append(f"{where}: max |B| = {a.max_abs_b:.3g}, {a.num_zero_b} of {a.num_b} LoRA B matrices all zero")
            if a.num_zero_b == a.num_b:
                status = Status.FAIL
            elif a.num_zero_b:
                status = Status.WARN
                fix = "some adapted modules never trained (frozen, or no gradient reaches them): check the LoRA targets"
    if p is not None:
        numbers.update(base_max_abs_diff=p.base_max_abs_diff, base_top1_changed=p.base_top1_changed)
        parts.append(f"scores move by up to {p.base_max_abs_diff:.3g} from the base model's, first choice changed "
                     f"on {_pct(p.base_top1_changed)} of {p.prompts} prompts")
        if p.base_max_abs_diff <= NOOP_TOL:
            status = Status.FAIL
    return CheckResult(cid, title, status, "; ".join(parts), "" if status is Status.PASS else fix, numbers=numbers)


# ---------------------------------------------------------------- loss


def _chance(ev: Evidence) -> tuple[float, str] | None:
    """The loss of a model that knows only how often each answer letter occurs, and how it was found."""
    t = ev.training
    if t is not None and t.label_counts and sum(t.label_counts.values()) > 0:
        k = len(t.label_counts)
        counts = list(t.label_counts.values())
        # Counts consistent with equal shares (a few hundred examples never match exactly) give ln(K);
        # clearly unequal ones give the loss of always answering with their frequencies.
        if stats.uniformity_p_value(counts) >= P_WARN:
            return math.log(k), f"ln({k}) = {math.log(k):.3f}"
        h = stats.entropy(counts)
        return h, f"{h:.3f}, the entropy of the training answers (ln({k}) = {math.log(k):.3f} if balanced)"
    k = None
    if t is not None and t.k_counts:
        k = _mode(t.k_counts)
    elif ev.verbalizer is not None and ev.verbalizer.labels:
        k = len(ev.verbalizer.labels)
    elif "test" in ev.split_k:
        k = _mode(ev.split_k["test"])
    if not k or k < 2:
        return None
    return math.log(k), f"ln({k}) = {math.log(k):.3f}"


def _finite_loss(ev: Evidence) -> tuple[np.ndarray, np.ndarray] | None:
    if ev.loss is None:
        return None
    keep = np.isfinite(ev.loss.values)
    return ev.loss.steps[keep], ev.loss.values[keep]


LOSS_NEEDS = "a training loss log (train_log.jsonl, or trainer_state.json log_history)"


def loss_falling(ev: Evidence) -> CheckResult:
    cid, title = "loss_falling", "the training loss falls"
    curve = _finite_loss(ev)
    if curve is None or len(curve[1]) < 2:
        return skipped(cid, title, ev.needs("loss", LOSS_NEEDS))
    steps, values = curve
    first, last, w = stats.ends(values)
    rel = (first - last) / abs(first) if first else 0.0
    value = (f"{first:.3f} -> {last:.3f} ({-rel:+.1%}) over {len(values)} logged steps "
             f"(means of the first and last {w})")
    numbers = {"first": first, "last": last, "relative_fall": rel, "points": len(values), "window": w}
    fix = ("raise the learning rate or train longer; check that gradients reach the adapter (grad norm in the "
           "log) and that the loss is taken on the answer token")
    if rel < LOSS_FLAT:
        return CheckResult(cid, title, Status.FAIL, value, fix, numbers=numbers)
    if rel < LOSS_SLOW:
        return CheckResult(cid, title, Status.WARN, value, fix, numbers=numbers)
    return CheckResult(cid, title, Status.PASS, value, numbers=numbers)


def loss_below_chance(ev: Evidence) -> CheckResult:
    cid, title = "loss_below_chance", "the training loss gets below chance"
    curve = _finite_loss(ev)
    if curve is None or len(curve[1]) < 1:
        return skipped(cid, title, ev.needs("loss", LOSS_NEEDS))
    chance = _chance(ev)
    if chance is None:
        return skipped(cid, title, "the number of candidates per training example")
    level, how = chance
    values = curve[1]
    _, final, w = stats.ends(values)
    lowest = float(stats.moving_average(values, w).min())
    value = f"final {final:.3f}, lowest {lowest:.3f} (moving mean of {w}) vs chance {how}"
    numbers = {"final": final, "lowest": lowest, "chance": level}
    details = ["chance: the loss of a model that knows only how often each letter is the answer; it assumes "
               "the logged loss is the cross-entropy of the answer token (rerank_dist: over the K labels)"]
    if final < level:
        return CheckResult(cid, title, Status.PASS, value, details=details, numbers=numbers)
    fix = ("the model has learned nothing beyond the answer-letter prior: train longer or with a higher learning "
           "rate; if the loss has plateaued, see capacity")
    status = Status.WARN if lowest < level else Status.FAIL
    return CheckResult(cid, title, status, value, fix, details, numbers)


def loss_stable(ev: Evidence) -> CheckResult:
    cid, title = "loss_stable", "the training loss does not diverge"
    if ev.loss is None or len(ev.loss.values) < 1:
        return skipped(cid, title, ev.needs("loss", LOSS_NEEDS))
    bad = ~np.isfinite(ev.loss.values)
    fix = "lower the learning rate or lengthen warmup, clip gradients, train in bf16/fp32 rather than fp16"
    if bad.any():
        step = int(ev.loss.steps[bad][0])
        return CheckResult(cid, title, Status.FAIL, f"{int(bad.sum())} non-finite losses (first at step {step})", fix,
                           numbers={"non_finite": int(bad.sum()), "first_step": step})
    values = ev.loss.values
    _, final, w = stats.ends(values)
    smooth = stats.moving_average(values, w)
    low = float(smooth.min())
    low_step = int(ev.loss.steps[int(np.argmin(smooth))])
    value = f"no NaN/inf; final {final:.3f} vs lowest {low:.3f} (step ~{low_step})"
    numbers = {"final": final, "lowest": low}
    if final > low * (1 + DIVERGE_REL) and final - low > DIVERGE_ABS:
        return CheckResult(cid, title, Status.FAIL, value + ": rising again",
                           fix + "; keep the checkpoint validation prefers, not the last", numbers=numbers)
    return CheckResult(cid, title, Status.PASS, value, numbers=numbers)


def val_vs_train(ev: Evidence) -> CheckResult:
    cid, title = "val_vs_train", "validation follows the training loss"
    curve = _finite_loss(ev)
    v = ev.validation
    if curve is None or len(curve[1]) < 2 or v is None or len(v.values) < 2:
        return skipped(cid, title, ev.needs("validation", "a validation curve (two or more evaluations)"))
    first, last, _ = stats.ends(curve[1])
    train_fall = (first - last) / abs(first) if first else 0.0
    vals = np.asarray(v.values, dtype=np.float64)
    sign = 1.0 if v.higher_is_better else -1.0
    best_i = int(np.argmax(sign * vals))
    best, v_first, v_last = float(vals[best_i]), float(vals[0]), float(vals[-1])
    improved = sign * (v_last - v_first) > 0
    if v.higher_is_better:
        got_worse = best - v_last > 0.5 * abs(best) and best_i < len(vals) - 1
    else:
        got_worse = v_last > best * 1.10 and v_last - best > 0.05 and best_i < len(vals) - 1
    base = f", retriever order {ev.validation_baseline:.4f}" if ev.validation_baseline is not None else ""
    value = (f"train loss {-train_fall:+.1%}; {v.name} {v_first:.4f} -> {v_last:.4f} (best {best:.4f} at step "
             f"{int(v.steps[best_i])}{base})")
    numbers = {"train_relative_fall": train_fall, "val_first": v_first, "val_last": v_last, "val_best": best,
               "val_best_step": int(v.steps[best_i])}
    if train_fall >= LOSS_SLOW and got_worse:
        return CheckResult(cid, title, Status.FAIL, value, "overfitting: fewer steps, a lower learning rate or more "
                           "data; score the checkpoint validation chose, not the last", numbers=numbers)
    if train_fall >= LOSS_SLOW and not improved:
        return CheckResult(cid, title, Status.WARN, value, "the model fits its training examples without "
                           "generalising: look for a train/eval mismatch (negatives, candidate count, letters) or "
                           "overfitting", numbers=numbers)
    return CheckResult(cid, title, Status.PASS, value, numbers=numbers)


def _size(n: int | None) -> str:
    if not n:
        return "unknown size"
    return f"{n / 1e9:.1f}B" if n >= 5e8 else f"{n / 1e6:.0f}M"


def capacity(ev: Evidence) -> CheckResult:
    cid, title = "capacity", "capacity: the loss is not stuck above the level of a useful ranker"
    curve = _finite_loss(ev)
    if curve is None or len(curve[1]) < CAPACITY_MIN_POINTS:
        return skipped(cid, title, f"a loss curve of at least {CAPACITY_MIN_POINTS} logged steps")
    chance = _chance(ev)
    if chance is None:
        return skipped(cid, title, "the number of candidates per training example")
    level = chance[0]
    values = curve[1]
    n = len(values)
    q3, q4 = values[n // 2: 3 * n // 4], values[3 * n // 4:]
    late_fall = (q3.mean() - q4.mean()) / abs(q3.mean()) if q3.mean() else 0.0
    _, final, _ = stats.ends(values)
    c = ev.capacity
    layers = c.lora_layers if c and isinstance(c.lora_layers, list) and c.lora_layers else None
    model = (f"backbone {c.model} ({_size(c.parameters)}), LoRA r={c.lora_r} on {','.join(c.lora_targets or []) or '?'}"
             + (f" in layers {min(layers)}-{max(layers)} only" if layers else "")
             + (f", {c.examples_seen} training examples seen" if c.examples_seen else "")) if c else "model unknown"
    numbers = {"final": final, "chance": level, "late_relative_fall": late_fall,
               "parameters": c.parameters if c else None, "lora_r": c.lora_r if c else None}
    plateau = late_fall < PLATEAU_REL
    if plateau and final > CAPACITY_SHARE * level:
        value = (f"plateaued at {final:.3f} = {final / level:.2f} x chance (last quarter {-late_fall:+.1%} vs the "
                 f"one before); {model}")
        fix = ("the model stopped improving well above a useful loss: a larger backbone (LlamaRec: Llama-2-7B), a "
               "higher LoRA rank or more target modules (e.g. all attention and MLP projections)"
               + (", adapters in every layer (model.lora_layers: 0)" if layers else "") + ", and more training examples")
        return CheckResult(cid, title, Status.WARN, value, fix, numbers=numbers)
    why = (f"still falling at the end ({-late_fall:+.1%} over the last quarter): budget, not capacity"
           if not plateau else f"final {final:.3f} = {final / level:.2f} x chance")
    return CheckResult(cid, title, Status.PASS, f"{why}; {model}", numbers=numbers)


# ---------------------------------------------------------------- candidates and metrics


def candidate_counts(ev: Evidence) -> CheckResult:
    cid, title = "candidate_counts", "train, validation and test show the same number of candidates"
    known = {s: c for s, c in ev.split_k.items() if c}
    if len(known) < 2:
        return skipped(cid, title, ev.needs("split_k", "candidate counts of at least two of train / val / test"))
    modes = {s: _mode(c) for s, c in known.items()}
    value = ", ".join(f"{s} {modes[s]}" for s in known)
    mixed = {s: dict(c) for s, c in known.items() if len(c) > 1}
    numbers = {"modes": modes, "mixed": {s: {str(k): v for k, v in m.items()} for s, m in mixed.items()}}
    if len(set(modes.values())) > 1:
        return CheckResult(cid, title, Status.FAIL, value + " candidates per example",
                           "train, validate and evaluate with the same number of candidates: letters A..T must "
                           "mean the same thing at training and at test time, and a check on 5 says nothing about 20",
                           numbers=numbers)
    if mixed:
        shown = "; ".join(f"{s}: " + ", ".join(f"{n} x {k}" for k, n in sorted(m.items())) for s, m in mixed.items())
        return CheckResult(cid, title, Status.WARN, f"{value}; uneven within a split ({shown})",
                           "give every example the same number of candidates", numbers=numbers)
    return CheckResult(cid, title, Status.PASS, value + " candidates per example", numbers=numbers)


ORDER_BLIND_FAMILIES = ORDER_INVARIANT  # the same for every order of the candidates once K >= their number


def metric_k(ev: Evidence) -> CheckResult:
    cid, title = "metric_k", "every reported metric can see the ranking (K < candidates)"
    if not ev.metrics:
        return skipped(cid, title, ev.needs("metrics", "the reported metrics (metrics_test.json or a metrics JSON)"))
    n = None
    if ev.rankings is not None and len(ev.rankings.num_candidates):
        n = int(np.bincount(ev.rankings.num_candidates).argmax())
    elif "test" in ev.split_k and ev.split_k["test"]:
        n = _mode(ev.split_k["test"])
    if n is None:
        return skipped(cid, title, "the number of candidates at test")
    blind = [m for m in ev.metrics if m.family in ORDER_BLIND_FAMILIES and m.k >= n]
    names = sorted({m.name for m in blind})
    numbers = {"num_candidates": n, "invariant": names, "reported": sorted({m.name for m in ev.metrics})}
    if not blind:
        ks = sorted({m.k for m in ev.metrics})
        return CheckResult(cid, title, Status.PASS, f"{len(ev.metrics)} metrics at K in {ks}, all below {n} "
                           "candidates", numbers=numbers)
    value = (f"{', '.join(names)} over {n} candidates: the same for every order of them (only the retriever's "
             f"hit rate)")
    fix = (f"report Recall/NDCG/MRR at K < {n} (LlamaRec: @5, @10) next to the retriever's order on the same "
           f"candidates")
    status = Status.WARN if all(m.flagged for m in blind) else Status.FAIL
    if status is Status.WARN:
        value += "; marked as such by the run"
    return CheckResult(cid, title, status, value, fix, numbers=numbers)


# ---------------------------------------------------------------- letters


def _front_loaded(counts: np.ndarray) -> bool:
    """Counts per displayed position (first letter first) that lean toward the first positions: the most
    frequent is in the first quarter and the mean position is in the first half. That is the shape a
    retriever's order gives (its best candidates first); a skew toward a middle or late letter is not."""
    counts = np.asarray(counts, dtype=np.float64)
    n, total = len(counts), counts.sum()
    if n < 2 or total <= 0:
        return False
    mean_pos = float((np.arange(n) * counts).sum() / total)
    return int(counts.argmax()) < max(1, math.ceil(n / 4)) and mean_pos < (n - 1) / 2


def _protocol_order(ev: Evidence, which: str) -> str | None:
    return getattr(ev.protocol, which, None) if ev.protocol is not None else None


RETRIEVER_ORDER_NOTE = ("expected with {key}=retriever: the candidates are shown in the retriever's order, so a "
                        "letter's position carries the retriever's rank and the first letters hold its best guesses")


def answer_balance(ev: Evidence) -> CheckResult:
    cid, title = "answer_balance", "training answers are spread over the letters"
    t = ev.training
    if t is None or not t.label_counts:
        return skipped(cid, title, ev.needs("label_counts", "the training examples' answers"))
    counts = t.label_counts
    order = [lab for lab in (ev.verbalizer.labels if ev.verbalizer is not None else []) if lab in counts]
    order += [lab for lab in counts if lab not in order]  # the letters in display order, A first
    n, k = sum(counts.values()), len(counts)
    top_label, top = max(counts.items(), key=lambda kv: kv[1])
    share = top / n if n else 0.0
    low = min(counts.values())
    p = stats.uniformity_p_value(list(counts.values()))
    ratio = f"{top / low:.1f}" if low else "inf (a letter is never the answer)"
    value = (f"'{top_label}' answers {_pct(share)} of {n} examples (uniform {_pct(1 / k)}); max/min {ratio}; "
             f"chi-square p = {p:.2g}")
    train_order = _protocol_order(ev, "train_order")
    numbers = {"counts": counts, "top": top_label, "top_share": share, "p_value": p, "train_order": train_order}
    fix = ("shuffle the candidates per example so that every letter is the answer equally often (rerank_dist: "
           "prompt.train_order=shuffled balances them exactly)")
    skewed = (p < P_FAIL and share >= 1.5 / k) or p < P_WARN
    if skewed and train_order == "retriever":
        if _front_loaded(np.array([counts[lab] for lab in order])):
            numbers["expected_under_protocol"] = True
            return CheckResult(cid, title, Status.PASS, value + "; " + RETRIEVER_ORDER_NOTE.format(key="train_order"),
                               numbers=numbers)
        value += "; not explained by train_order=retriever (that leans toward the first letters, this does not)"
        fix = ("the answers lean toward letters the retriever's order does not favour: check how the target's "
               "slot is chosen (examples.py) and that the recorded counts are the training answers")
    if p < P_FAIL and share >= 1.5 / k:
        return CheckResult(cid, title, Status.FAIL, value, fix, numbers=numbers)
    if p < P_WARN:
        return CheckResult(cid, title, Status.WARN, value, fix, numbers=numbers)
    return CheckResult(cid, title, Status.PASS, value, numbers=numbers)


def _position_name(ev: Evidence, pos: int, n: int) -> str:
    labels = ev.rankings.labels if ev.rankings is not None else None
    name = f"'{labels[pos]}'" if labels and pos < len(labels) else f"position {pos + 1}"
    return name + (" (first)" if pos == 0 else " (last)" if pos == n - 1 else "")


def predicted_letters(ev: Evidence) -> CheckResult:
    cid, title = "predicted_letters", "test predictions are not collapsed onto one letter or position"
    r = ev.rankings
    if r is None or r.top_position is None:
        return skipped(cid, title, ev.needs("scores", "test scores per displayed candidate"))
    keep = r.num_candidates >= 2
    top = r.top_position[keep]
    n = int(np.bincount(r.num_candidates[keep]).argmax()) if keep.any() else 0
    if not len(top) or n < 2:
        return skipped(cid, title, "test users with two or more candidates")
    counts = np.bincount(top, minlength=n)[:n]
    users = len(top)
    pos = int(counts.argmax())
    share = counts[pos] / users
    p = stats.uniformity_p_value(counts)
    value = (f"{_position_name(ev, pos, n)} is the first choice for {_pct(share)} of {users} users (uniform "
             f"{_pct(1 / n)}); first position {_pct(counts[0] / users)}, last {_pct(counts[-1] / users)}; "
             f"chi-square p = {p:.2g}")
    eval_order, train_order = _protocol_order(ev, "eval_order"), _protocol_order(ev, "train_order")
    numbers = {"counts": counts.tolist(), "top_position": pos, "top_share": float(share), "p_value": p,
               "eval_order": eval_order, "train_order": train_order}
    fix = ("the model learned a position, not a preference: balance the answer letters in training, shuffle the "
           "candidates, and check the label tokens (verbalizer)")
    collapsed = share >= COLLAPSE_SHARE
    skewed = collapsed or (p < P_FAIL and share >= 2.0 / n)
    if skewed and eval_order == "retriever":
        if _front_loaded(counts):
            note = RETRIEVER_ORDER_NOTE.format(key="eval_order")
            numbers["expected_under_protocol"] = True
            if collapsed and train_order != "retriever":
                # Training showed shuffled letters, so the model has no learned reason to favour a position:
                # the eval order explains a lean toward the first letters, not a collapse onto them.
                return CheckResult(cid, title, Status.WARN, "collapsed: " + value + f"; {note}, but training "
                                   f"showed shuffled letters (train_order={train_order or 'unknown'}), which "
                                   "explains a lean, not a collapse",
                                   "check the model's preference with the candidates shuffled (prompt.eval_order="
                                   "shuffled, or score.permutations > 1)", numbers=numbers)
            return CheckResult(cid, title, Status.PASS, ("collapsed: " if collapsed else "") + value + "; " + note
                               + ("; whether it adds to the retriever: reranker_vs_baselines" if collapsed else ""),
                               numbers=numbers)
        value += "; not explained by eval_order=retriever (that leans toward the first letters, this does not)"
    if collapsed:
        return CheckResult(cid, title, Status.FAIL, "collapsed: " + value, fix, numbers=numbers)
    if p < P_FAIL and share >= 2.0 / n:
        return CheckResult(cid, title, Status.WARN, value, fix, numbers=numbers)
    return CheckResult(cid, title, Status.PASS, value, numbers=numbers)


# ---------------------------------------------------------------- negatives


def _popularity_js(ev: Evidence) -> tuple[float, float, float] | None:
    """JS divergence of popularity bins (deciles of the evaluation candidates'), and the two medians."""
    t, r, pop = ev.training, ev.rankings, ev.popularity
    if t is None or not t.negative_items or r is None or not r.candidate_items or pop is None:
        return None
    targets = r.targets or [None] * len(r.candidate_items)
    eval_neg = np.array([pop.get(i, 0) for cands, tg in zip(r.candidate_items, targets) for i in cands if i != tg],
                        dtype=np.float64)
    train_neg = np.array([pop.get(i, 0) for i in t.negative_items], dtype=np.float64)
    if not len(eval_neg) or not len(train_neg):
        return None
    edges = np.unique(np.quantile(eval_neg, np.linspace(0.1, 0.9, 9)))
    bins = len(edges) + 1
    h_eval = np.bincount(np.searchsorted(edges, eval_neg, side="right"), minlength=bins)
    h_train = np.bincount(np.searchsorted(edges, train_neg, side="right"), minlength=bins)
    return stats.js_divergence(h_train, h_eval), float(np.median(train_neg)), float(np.median(eval_neg))


def negatives_match(ev: Evidence) -> CheckResult:
    cid, title = "negatives_match", "training negatives look like the evaluation candidates"
    t, r = ev.training, ev.rankings
    if t is None or (t.negatives_declared is None and not t.negative_items and t.target_in_list_rate is None):
        return skipped(cid, title, ev.needs("negatives", "the training candidates (item ids) or their source"))
    fails: list[str] = []
    warns: list[str] = []
    parts: list[str] = []
    numbers: dict = {}
    source = t.negatives_declared or "unknown"
    parts.append(f"source {source}" + (f" ({t.candidate_source_note})" if t.candidate_source_note else ""))
    if source == "random":
        fails.append("random")
    elif source == "mixed":
        warns.append("mixed")
    eval_rate = float((r.target_index >= 0).mean()) if r is not None and len(r.target_index) else None
    if t.target_in_list_rate is not None and eval_rate is not None:
        parts.append(f"target in {_pct(t.target_in_list_rate)} of training lists before insertion vs "
                     f"{_pct(eval_rate)} at test")
        numbers.update(train_target_rate=t.target_in_list_rate, test_target_rate=eval_rate)
        if t.target_in_list_rate > 1.5 * eval_rate + 0.1:
            warns.append("easier training lists")
    js = _popularity_js(ev)
    if js is not None:
        d, med_train, med_eval = js
        parts.append(f"popularity JS {d:.2f} bits (median {med_train:.0f} vs {med_eval:.0f} {ev.popularity_source})")
        numbers.update(popularity_js=d, median_train=med_train, median_eval=med_eval)
        if d >= JS_FAIL:
            fails.append("popularity")
            if source == "unknown":
                parts[0] = "source not recorded, but the popularity says random"
        elif d >= JS_WARN:
            warns.append("popularity")
    value = "; ".join(parts)
    fix = ("train on the retriever's candidates for training prefixes, the hard negatives evaluation uses "
           "(rerank_dist: prompt.negatives=retriever with retriever.train_candidates=held_out)")
    if "easier training lists" in warns and not fails:
        fix = ("training lists come from a retriever that saw the training targets: use a held-out retriever for "
               "them (rerank_dist: retriever.train_candidates=held_out)")
    numbers["source"] = source
    if fails:
        return CheckResult(cid, title, Status.FAIL, value, fix, numbers=numbers)
    if warns:
        return CheckResult(cid, title, Status.WARN, value, fix, numbers=numbers)
    return CheckResult(cid, title, Status.PASS, value, numbers=numbers)


# ---------------------------------------------------------------- verbalizer


def verbalizer(ev: Evidence) -> CheckResult:
    cid, title = "verbalizer", "label tokens: trained ids = scored ids, one token each in context"
    v = ev.verbalizer
    if v is None or (v.scored_ids is None and v.in_context_ids is None and v.in_context_error is None):
        return skipped(cid, title, ev.needs("verbalizer", "the label ids the scorer read, or a tokenizer and prompts"))
    numbers = {"labels": v.labels, "scored_ids": v.scored_ids, "trained_ids": v.trained_ids,
               "in_context_ids": v.in_context_ids, "naive_mismatches": v.naive_mismatches}
    fix = ("score exactly the ids the loss trained: the token that follows the prompt, resolved in context "
           "(rerank_dist.verbalizer.resolve_label_ids), stored with the adapter and read back by the scorer")
    fails: list[str] = []

    def diff(a: list[int], b: list[int]) -> str:
        bad = [f"{lab}: {x} vs {y}" for lab, x, y in zip(v.labels, a, b) if x != y]
        return ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")

    if v.in_context_error:
        fails.append(f"not one token in context: {v.in_context_error}")
    # Label by label over the labels both lists have: a different number of candidates is candidate_counts'.
    if v.trained_ids is not None and v.scored_ids is not None and diff(v.trained_ids, v.scored_ids):
        fails.append(f"trained ids differ from scored ids ({diff(v.trained_ids, v.scored_ids)})")
    if v.in_context_ids is not None and v.scored_ids is not None and diff(v.scored_ids, v.in_context_ids):
        fails.append(f"scored ids are not the tokens that follow the prompt ({diff(v.scored_ids, v.in_context_ids)})")
    details = v.naive_mismatches[:5]
    if fails:
        if v.naive_mismatches:
            fails.append(f"standalone tokenisation differs for {len(v.naive_mismatches)} labels, e.g. "
                         f"{v.naive_mismatches[0]}")
        return CheckResult(cid, title, Status.FAIL, "; ".join(fails), fix, details, numbers)
    if v.scored_ids is None and v.naive_mismatches:
        return CheckResult(cid, title, Status.WARN,
                           f"{len(v.naive_mismatches)} labels tokenise differently alone than after the prompt, "
                           f"e.g. {v.naive_mismatches[0]}; the scored ids are not recorded",
                           "make sure the scorer reads the in-context ids, not tokenizer.encode(letter)", details,
                           numbers)
    ids = v.scored_ids if v.scored_ids is not None else v.in_context_ids
    agreed = [name for name, x in (("trained", v.trained_ids), ("scored", v.scored_ids),
                                   ("in context", v.in_context_ids)) if x is not None]
    n = min(len(ids), len(v.labels))
    value = (f"{len(v.labels)} labels, one token each; {' = '.join(agreed)}"
             f" ({v.labels[0]}={ids[0]} ... {v.labels[n - 1]}={ids[n - 1]})")
    return CheckResult(cid, title, Status.PASS, value, "", details, numbers)


# ---------------------------------------------------------------- ranking quality


def _interval(d: tuple[float, float, float]) -> str:
    return f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"


def reranker_vs_baselines(ev: Evidence, resamples: int = 2000, seed: int = 0) -> CheckResult:
    """Two questions, each with a paired bootstrap over all users: does the LLM's own order beat a random
    order (did it learn anything), and does the run's final order beat the retriever's (does it add
    anything)? The final order is the LLM's own unless the run says otherwise (rerank_dist: final_order,
    e.g. a fusion with the retriever's scores, which can beat the retriever with a useless LLM: hence
    the first question is always asked of the LLM's own order)."""
    cid, title = "reranker_vs_baselines", "the reranker beats random and retriever order on the same candidates"
    r = ev.rankings
    if r is None or not len(r.reranker_rank):
        return skipped(cid, title, ev.needs("rankings", "evaluation rankings (user, candidates, scores or ranked "
                                                        "list, target)"))
    k = int(min(NDCG_K, r.num_candidates.max()))
    present = r.target_index >= 0
    rer = stats.ndcg_at(r.reranker_rank, k)
    rnd = stats.expected_random_ndcg(present, r.num_candidates, k)
    users, hits = len(rer), int(present.sum())
    ceiling = hits / users
    d_rnd = stats.paired_bootstrap(rer - rnd, resamples, seed)
    # The order judged against the retriever: the run's final one when its ranks are recorded.
    separate = r.final_order != "reranker" and r.final_rank is not None
    final_name = r.final_order if separate else "reranker"
    fin = stats.ndcg_at(r.final_rank, k) if separate else rer
    numbers = {"metric": f"ndcg@{k}", "users": users, "retrieved": hits, "ceiling_hit_rate": ceiling,
               "reranker": float(rer.mean()), "random": float(rnd.mean()), "vs_random": d_rnd,
               "final_order": final_name, "bootstrap": {"resamples": resamples, "seed": seed}}
    llm = "LLM (pure)" if separate else "reranker"
    parts = [f"NDCG@{k} {llm} {rer.mean():.4f}"]
    if separate:
        numbers["final"] = float(fin.mean())
        parts[0] += f", final ({final_name}) {fin.mean():.4f}"
    parts[0] += f", random {rnd.mean():.4f}"
    d_ret = None
    if r.retriever_rank is not None:
        ret = stats.ndcg_at(r.retriever_rank, k)
        d_ret = stats.paired_bootstrap(fin - ret, resamples, seed)
        numbers.update(retriever=float(ret.mean()), vs_retriever=d_ret)
        parts[0] += f", retriever order {ret.mean():.4f}"
        if separate:
            numbers["reranker_vs_retriever"] = stats.paired_bootstrap(rer - ret, resamples, seed)
    parts[0] += f" ({users} users)"
    parts.append((f"{llm} vs random " if separate else "vs random ") + _interval(d_rnd))
    if d_ret is not None:
        parts.append((f"final ({final_name}) vs retriever " if separate else "vs retriever ") + _interval(d_ret))
    parts.append(f"ceiling (hit rate) {ceiling:.3f}")
    value = "; ".join(parts)
    details = [f"95% intervals: paired bootstrap over users, {resamples} resamples, seed {seed}; random = the exact "
               f"expectation of a uniformly random order of each user's candidates"]
    if separate:
        details.append(f"the run's final order is {final_name}: it is judged against the retriever's order, the "
                       f"LLM's own order against random")
    elif r.final_order != "reranker":
        details.append(f"the run's final order is {r.final_order}, but the rankings do not record its ranks "
                       f"(final_scores / target_rank): the LLM's own order is judged against both baselines")
    if hits < MIN_RETRIEVED:
        return CheckResult(cid, title, Status.WARN, value + f"; only {hits} users have the target among their "
                           "candidates: too few to tell", "evaluate on more users, or with a retriever that finds "
                           "more targets", details, numbers)
    if d_rnd[1] <= 0:
        return CheckResult(cid, title, Status.FAIL, value + ": " + ("the LLM's own order is " if separate else "")
                           + "not distinguishable from random",
                           "the ranker learned nothing usable: see the loss, answer balance, negatives and "
                           "verbalizer checks", details, numbers)
    if d_ret is not None and d_ret[1] <= 0:
        if separate:
            return CheckResult(cid, title, Status.WARN, value + f": the final ({final_name}) order does not beat "
                               "the retriever's order", "the LLM does not add to the retriever yet: more training, "
                               "a larger backbone (LlamaRec: 7B), or keep the retriever's order", details, numbers)
        return CheckResult(cid, title, Status.WARN, value + ": does not beat the retriever's order",
                           "the reranker does not add to the retriever yet: more training, a larger backbone "
                           "(LlamaRec: 7B), or keep the retriever's order", details, numbers)
    return CheckResult(cid, title, Status.PASS, value, "", details, numbers)


CHECKS: list[tuple[str, Callable[[Evidence], CheckResult]]] = [
    ("best_weights_scored", best_weights_scored),
    ("scores_reproduce", scores_reproduce),
    ("adapter_not_noop", adapter_not_noop),
    ("loss_falling", loss_falling),
    ("loss_below_chance", loss_below_chance),
    ("loss_stable", loss_stable),
    ("val_vs_train", val_vs_train),
    ("capacity", capacity),
    ("candidate_counts", candidate_counts),
    ("metric_k", metric_k),
    ("answer_balance", answer_balance),
    ("predicted_letters", predicted_letters),
    ("negatives_match", negatives_match),
    ("verbalizer", verbalizer),
    ("reranker_vs_baselines", reranker_vs_baselines),
]
CHECK_IDS = [cid for cid, _ in CHECKS]


def run_checks(ev: Evidence, resamples: int = 2000, seed: int = 0) -> list[CheckResult]:
    """Every check on the evidence; a check that raises becomes a failure naming the error, never a crash."""
    results = []
    for cid, fn in CHECKS:
        try:
            result = fn(ev, resamples, seed) if fn is reranker_vs_baselines else fn(ev)
        except Exception as err:  # a doctor that crashes on a strange run diagnoses nothing
            result = CheckResult(cid, cid, Status.FAIL, f"the check itself failed: {type(err).__name__}: {err}",
                                 "report this with the run's files")
        results.append(result)
    return results
