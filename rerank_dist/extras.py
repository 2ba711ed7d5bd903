"""Optional features and the pip extra that installs what each needs (pyproject.toml).

The core package runs the default job and the doctor; QLoRA (bitsandbytes) and the DeepSpeed
backends are extras. A feature used without its extra stops with one line naming the pip command,
at the point where the feature is first needed, rather than with an ImportError deep in a library.
"""

from __future__ import annotations

import importlib.util

from rerank_dist.config import ConfigError


class MissingExtraError(ConfigError):
    """A config asks for a feature whose optional dependency is not installed."""


def require(module: str, extra: str, feature: str) -> None:
    """Raise MissingExtraError unless module is importable; feature names the setting that needs it."""
    # find_spec only looks the module up: importing deepspeed just to see it is there takes seconds.
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"{feature} needs {module}: pip install 'rerank_dist[{extra}]'")
