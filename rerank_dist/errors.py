"""The errors that mean "bad input or config", as opposed to a bug.

The CLI prints these as one-line messages and exits with status 2; anything else keeps its
traceback, because it is a bug to report.
"""

from __future__ import annotations

from rerank_dist.config import ConfigError
from rerank_dist.data import DataError
from rerank_dist.io import JsonlError
from rerank_dist.model_source import ModelSourceError
from rerank_dist.prompts import PromptError
from rerank_dist.run_lock import RunLockError
from rerank_dist.verbalizer import VerbalizerError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, ModelSourceError, PromptError,
                                                 VerbalizerError, JsonlError, RunLockError,
                                                 FileNotFoundError)
