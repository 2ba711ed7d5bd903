"""What a check returns, and how the results add up to a verdict and an exit code."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(str, enum.Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skipped"


# Exit codes a CI job can gate on: 0 all passed (skipped checks allowed), 1 warnings, 2 failures.
EXIT_CODES = {Status.PASS: 0, Status.SKIP: 0, Status.WARN: 1, Status.FAIL: 2}


@dataclass
class CheckResult:
    """One line of the doctor's table: the verdict, the number behind it and what to do about it."""

    id: str                       # stable name, e.g. "loss_below_chance"
    title: str                    # what is being claimed, e.g. "loss gets below chance"
    status: Status
    value: str                    # the number(s) behind the verdict, one line
    fix: str = ""                 # what to change; empty when the check passed
    details: list[str] = field(default_factory=list)  # longer evidence, for doctor.md
    numbers: dict[str, Any] = field(default_factory=dict)  # machine-readable evidence, for doctor.json

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "status": self.status.value, "value": self.value,
                "fix": self.fix, "details": self.details, "numbers": self.numbers}


def skipped(check_id: str, title: str, needs: str) -> CheckResult:
    """A check whose inputs are missing: never a crash, always the input it would need."""
    return CheckResult(check_id, title, Status.SKIP, f"skipped (needs {needs})")


@dataclass
class DoctorReport:
    """Every check's result for one run, plus where the evidence came from."""

    target: str                   # the run directory or file examined
    kind: str                     # rerank_dist | hf_trainer | predictions
    results: list[CheckResult]
    sources: dict[str, str] = field(default_factory=dict)  # evidence name -> file it was read from
    inputs_fingerprint: str = ""  # sha256 of the run's metrics file: ties doctor.json to the outputs it saw
    plots: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for r in self.results:
            out[r.status.value] += 1
        return out

    @property
    def exit_code(self) -> int:
        return max((EXIT_CODES[r.status] for r in self.results), default=0)

    @property
    def verdict(self) -> str:
        return {0: "pass", 1: "warnings", 2: "failures"}[self.exit_code]

    def by_id(self) -> dict[str, CheckResult]:
        return {r.id: r for r in self.results}

    def summary_line(self) -> str:
        c = self.counts()
        worst = [r.id for r in self.results if r.status is Status.FAIL] or \
                [r.id for r in self.results if r.status is Status.WARN]
        named = f": {', '.join(worst)}" if worst else ""
        return (f"{c['fail']} failed, {c['warn']} warned, {c['pass']} passed, {c['skipped']} skipped"
                f"{named} (exit {self.exit_code})")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "verdict": self.verdict, "exit_code": self.exit_code,
                "counts": self.counts(), "summary": self.summary_line(), "sources": self.sources,
                "inputs_fingerprint": self.inputs_fingerprint, "plots": self.plots,
                "checks": [r.to_dict() for r in self.results]}
