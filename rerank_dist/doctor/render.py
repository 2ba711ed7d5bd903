"""The doctor's outputs: the console table, doctor.md, doctor.json, PNG plots, and the short
summary report.md carries. Every file is written atomically (``io``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rerank_dist.doctor import stats
from rerank_dist.doctor.evidence import Evidence
from rerank_dist.doctor.readers import KINDS
from rerank_dist.doctor.result import DoctorReport, Status
from rerank_dist.io import atomic_write_text, read_json, write_json, write_png

JSON_NAME, MD_NAME = "doctor.json", "doctor.md"
LOSS_PNG, LETTERS_PNG = "doctor_loss.png", "doctor_letters.png"
MARK = {Status.PASS: "PASS", Status.WARN: "WARN", Status.FAIL: "FAIL", Status.SKIP: "SKIP"}


def console_lines(report: DoctorReport) -> list[str]:
    """One line per check: status, check, the number behind it and, unless it passed, the fix."""
    width = max(len(r.id) for r in report.results)
    lines = [f"rerank-dist doctor: {report.target} ({KINDS.get(report.kind, report.kind)})"]
    for r in report.results:
        fix = f"  | fix: {r.fix}" if r.fix and r.status in (Status.WARN, Status.FAIL) else ""
        lines.append(f"{MARK[r.status]}  {r.id:<{width}}  {r.value}{fix}")
    lines.append(f"doctor: {report.summary_line()}")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: DoctorReport) -> str:
    lines = [f"# rerank-dist doctor: {report.target}", "",
             f"{KINDS.get(report.kind, report.kind)}; verdict: **{report.verdict}** ({report.summary_line()})", "",
             "| status | check | claim | evidence | fix |", "|---|---|---|---|---|"]
    for r in report.results:
        lines.append(f"| {MARK[r.status]} | `{r.id}` | {_cell(r.title)} | {_cell(r.value)} | {_cell(r.fix)} |")
    detailed = [r for r in report.results if r.details]
    if detailed:
        lines += ["", "## Details", ""]
        for r in detailed:
            lines.append(f"- `{r.id}`: " + "; ".join(r.details))
    if report.sources:
        lines += ["", "## Read from", ""] + [f"- {k}: `{v}`" for k, v in report.sources.items()]
    if report.plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report.plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(ev: Evidence, chance: float | None, out: Path) -> bool:
    """Training loss (raw and moving mean) against chance; validation on a second axis."""
    if ev.loss is None or len(ev.loss.values) < 2:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, values = ev.loss.steps, ev.loss.values
    ax.plot(steps, values, lw=0.8, alpha=0.5, label="train loss")
    w = stats.window_size(len(values))
    if w > 1:
        smooth = stats.moving_average(values, w)
        ax.plot(steps[w - 1:], smooth, lw=1.6, label=f"moving mean ({w})")
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance {chance:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if ev.validation is not None and len(ev.validation.values):
        ax2 = ax.twinx()
        ax2.plot(ev.validation.steps, ev.validation.values, "o-", color="tab:red", lw=1, label=ev.validation.name)
        ax2.set_ylabel(ev.validation.name)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8)
    ax.set_title("training loss vs chance")
    fig.tight_layout()
    write_png(fig, out)
    return True


def plot_letters(ev: Evidence, out: Path) -> bool:
    """Training answers per letter, and the test's first choices per displayed position."""
    train = ev.training.label_counts if ev.training is not None and ev.training.label_counts else None
    r = ev.rankings
    test = None
    if r is not None and r.top_position is not None and len(r.top_position):
        n = int(np.bincount(r.num_candidates).argmax())
        test = np.bincount(r.top_position[r.top_position < n], minlength=n)[:n]
    if train is None and test is None:
        return False
    plt = _pyplot()
    panels = [p for p in (("training answers", train), ("test first choices", test)) if p[1] is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (title, counts) in zip(axes[0], panels):
        if isinstance(counts, dict):
            names, values = list(counts), list(counts.values())
        else:
            labels = r.labels if r.labels and len(r.labels) >= len(counts) else [str(i + 1) for i in range(len(counts))]
            names, values = labels[: len(counts)], list(map(int, counts))
        ax.bar(range(len(values)), values)
        ax.axhline(sum(values) / max(len(values), 1), color="grey", ls="--", lw=1, label="uniform")
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_png(fig, out)
    return True


def write_outputs(report: DoctorReport, ev: Evidence, out_dir: Path, plots: bool = True) -> list[Path]:
    """doctor.json, doctor.md and the PNGs in out_dir; returns what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if plots:
        chance = report.by_id().get("loss_below_chance")
        level = chance.numbers.get("chance") if chance is not None else None
        for name, made in ((LOSS_PNG, lambda p: plot_loss(ev, level, p)), (LETTERS_PNG, lambda p: plot_letters(ev, p))):
            if made(out_dir / name):
                report.plots.append(name)
                written.append(out_dir / name)
    write_json(out_dir / JSON_NAME, _jsonable(report.to_dict()))
    atomic_write_text(out_dir / MD_NAME, markdown(report))
    return [out_dir / JSON_NAME, out_dir / MD_NAME] + written


def _jsonable(obj: Any) -> Any:
    """numpy scalars, tuples and infinities as JSON can hold them."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, Counter):
        return dict(obj)
    return obj


# ---------------------------------------------------------------- report.md


def summary_for_report(doctor_json: Path, fingerprint: str | None) -> list[str]:
    """The doctor section of report.md: verdict and the lines that did not pass, if doctor.json was made
    from these outputs (its fingerprint is the metrics file's sha256); otherwise how to run it."""
    if not doctor_json.is_file():
        return [f"Doctor: not run yet (`rerank-dist doctor {doctor_json.parent}`)."]
    try:
        data = read_json(doctor_json)
    except (OSError, json.JSONDecodeError):
        return [f"Doctor: {doctor_json} is unreadable; run `rerank-dist doctor {doctor_json.parent}` again."]
    if fingerprint is not None and data.get("inputs_fingerprint") != fingerprint:
        return [f"Doctor: {doctor_json.name} was made from earlier outputs; run `rerank-dist doctor "
                f"{doctor_json.parent}` again."]
    lines = [f"Doctor: **{data.get('verdict')}**, {data.get('summary')}; full table in {MD_NAME}."]
    for check in data.get("checks", []):
        if check["status"] in ("fail", "warn"):
            lines.append(f"- {check['status'].upper()} `{check['id']}`: {check['value']}"
                         + (f" (fix: {check['fix']})" if check.get("fix") else ""))
    return lines
