"""Read a run, run every check, write the outputs: the doctor from end to end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rerank_dist.doctor.checks import run_checks
from rerank_dist.doctor.evidence import Evidence
from rerank_dist.doctor.readers import ForeignOptions, OwnRunOptions, read_evidence
from rerank_dist.doctor.render import console_lines, write_outputs
from rerank_dist.doctor.result import DoctorReport

if TYPE_CHECKING:
    from rerank_dist.config import RunConfig


@dataclass
class DoctorOptions:
    """What the doctor reads and how far it goes (the `rerank-dist doctor` flags)."""

    split: str = "test"                        # which scored split of a rerank_dist run
    model: bool = True                         # reload the saved weights and re-score a sample
    sample_users: int = 16                     # prompts re-scored (whole scorer batches, at least this many)
    device: str | None = None                  # for the re-scoring; default cuda if available, else cpu
    predictions: Path | None = None            # foreign runs: predictions / rankings file
    train_file: Path | None = None             # foreign runs: training examples
    metrics: Path | None = None                # foreign runs: reported metrics (JSON)
    columns: dict[str, str] = field(default_factory=dict)  # role -> column name, overriding the guesses
    retriever_order: str = "auto"              # auto | given | none (see readers.tables.read_predictions)
    label_ids: list[int] | None = None         # foreign runs: the token ids the scorer read
    train_negatives: str | None = None         # foreign runs: how training negatives were drawn
    resamples: int = 2000                      # bootstrap resamples over users
    seed: int = 0                              # for the bootstrap and the re-scoring sample
    out: Path | None = None                    # where doctor.md/json and PNGs go (default: the run)
    plots: bool = True
    write: bool = True


def diagnose(target: Path, options: DoctorOptions, say: Callable[[str], None] = lambda m: None,
             cfg: RunConfig | None = None) -> tuple[DoctorReport, Evidence]:
    """Every check on target; nothing written."""
    own = OwnRunOptions(split=options.split, model=options.model, sample_users=options.sample_users,
                        seed=options.seed, device=options.device)
    foreign = ForeignOptions(predictions=options.predictions, train_file=options.train_file, metrics=options.metrics,
                             columns=dict(options.columns), retriever_order=options.retriever_order,
                             label_ids=options.label_ids, train_negatives=options.train_negatives)
    ev = read_evidence(Path(target), own, foreign, say, cfg)
    results = run_checks(ev, options.resamples, options.seed)
    report = DoctorReport(target=str(target), kind=ev.kind, results=results, sources=ev.sources,
                          inputs_fingerprint=ev.fingerprint)
    return report, ev


def run_doctor(target: Path, options: DoctorOptions | None = None, say: Callable[[str], None] = print,
               cfg: RunConfig | None = None) -> DoctorReport:
    """diagnose, print the table, write doctor.json / doctor.md / PNGs (into the run, or options.out).

    cfg: a rerank_dist run's config when the caller has it (the pipeline); otherwise its config.yaml is read."""
    options = options or DoctorOptions()
    target = Path(target)
    report, ev = diagnose(target, options, say, cfg)
    if options.write:
        out = options.out or (target if target.is_dir() else target.parent)
        write_outputs(report, ev, Path(out), options.plots)
    for line in console_lines(report):
        say(line)
    return report
