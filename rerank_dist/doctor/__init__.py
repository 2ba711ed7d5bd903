"""rerank-dist doctor: find every way a reranker run quietly fails, on its own runs and on foreign ones.

``rerank-dist doctor RUN`` reads a rerank_dist run directory, a Hugging Face Trainer / TRL output
directory, or a predictions file, and prints one line per check (pass / warn / fail / skipped), the
number behind it and the fix; it writes doctor.md, doctor.json and PNG plots, and exits 0 / 1 / 2
for pass / warnings / failures.

Modules, one responsibility each:

- ``readers/``: turn a run of some kind into ``evidence.Evidence`` (``own_run``, ``hf_trainer``,
  ``tables`` for predictions and training files, ``safe_pickle`` for training_args.bin);
- ``probe``: rebuild a rerank_dist run's prompts and re-run its saved weights with the project's own
  loading and scoring functions;
- ``checks``: the checks, pure functions of the evidence; ``stats``: the statistics they use;
- ``render``: console table, markdown, JSON, plots, the report.md summary; ``runner``: all of it in order;
- ``cli``: the command's flags.
"""

from __future__ import annotations

import importlib
from typing import Any

# Exported names and the module holding each, imported on first use: the CLI builds its parser from
# doctor.cli without paying for pandas, matplotlib or torch.
_EXPORTS = {"CHECK_IDS": "checks", "DoctorInputError": "readers.common", "CheckResult": "result",
            "DoctorReport": "result", "Status": "result", "DoctorOptions": "runner", "diagnose": "runner",
            "run_doctor": "runner"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rerank_dist.doctor' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rerank_dist.doctor.{_EXPORTS[name]}"), name)
