"""The settings a command runs with: every problem found at once, before any stage or model loads.

``config.py`` is the schema (the values and what each may be); the batch plan (``plan.py``) is a
rule over those values and the number of processes. Both are checked here, so a bad combination of
``train.batch_size`` and the launcher's world size is reported with the rest of the config's
problems, one line each.
"""

from __future__ import annotations

from pathlib import Path

from rerank_dist.config import ConfigError, RunConfig, parse_config, recorded_base
from rerank_dist.plan import plan_problems


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int | None = None, base: RunConfig | None = None) -> RunConfig:
    """base (default: the defaults) <- YAML file <- dotted overrides; then validated, batch plan included,
    for world_size processes (default: the launcher's). Raises ConfigError listing every problem."""
    cfg, errors = parse_config(path, overrides, base)
    errors += plan_problems(cfg, world_size)
    if errors:
        where = f"{path}: " if path else ""
        raise ConfigError("\n".join(f"{where}{e}" for e in errors))
    return cfg


def resolve_config(path: str | Path | None = None, overrides: list[str] | None = None,
                   world_size: int | None = None) -> tuple[RunConfig, Path | None]:
    """The config a command runs with, and the recorded config it started from (None for a new run):
    on an existing run directory, that run's own config.yaml comes first (config.recorded_base)."""
    base, recorded = recorded_base(path, overrides)
    return load_config(path, overrides, world_size, base=base), recorded
