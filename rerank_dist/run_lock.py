"""One writer per run directory: ``<run_dir>/.writer.lock``, held while a stage writes there.

Two trainings on one run directory (the same command started twice, or a Slurm job resubmitted
while its requeued twin still runs) would both append every line of train_log.jsonl and both write
the same step-N/ and best/. So every stage that writes a run directory holds this lock
(``pipeline.py`` wraps them), and a second writer is refused with one line naming the holder.

- The lock file is created with O_CREAT|O_EXCL, so of two starters exactly one gets it, and holds
  JSON: host, pid, Slurm job id, stage, start and heartbeat times (and a token naming this holding).
- Run directories live on filesystems several nodes share, where a holder on another node cannot be
  asked whether it is alive (and flock does not reach it): the holder rewrites its heartbeat every
  HEARTBEAT_S seconds from a background thread.
- A stale lock is taken over, with a message: its holder ran on this host (and PID namespace) and
  that pid is gone; or its heartbeat is older than STALE_S; or it has this process's Slurm job id (a
  requeued job keeps its id, and Slurm stopped the predecessor before restarting it). Whoever takes
  over removes the stale file under a second O_EXCL file, so two takers cannot both succeed.
- Only the job's main process (global rank 0, the RANK variable launchers set) takes it; the others
  are that process's own job. A main process refused by the lock exits, and the launcher then
  stops the others.
- Re-entrant within a process: ``rerank-dist run`` holds it once across all its stages.
- Released on exit, exceptions included; a process killed outright (kill -9) leaves a lock that the
  next writer finds stale as above.

No torch import here: the lock is taken before any process group exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from rerank_dist.io import atomic_write_text

LOCK_NAME = ".writer.lock"
# Seconds between heartbeats, and the age after which a heartbeat means its holder is gone (tests set
# them small; a slow shared filesystem or clocks a little apart between nodes call for a larger one).
HEARTBEAT_ENV, STALE_ENV = "RERANK_DIST_LOCK_HEARTBEAT_S", "RERANK_DIST_LOCK_STALE_S"
DEFAULT_HEARTBEAT_S = 30.0


class RunLockError(RuntimeError):
    """Another live writer holds the run directory (one-line message naming it)."""


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RunLockError(f"environment variable {name}={value!r}: expected a number of seconds > 0")
    return seconds


def heartbeat_s() -> float:
    return _seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)


def stale_s() -> float:
    """A heartbeat older than this means its holder is gone: 4 missed beats unless set."""
    return _seconds(STALE_ENV, 4 * heartbeat_s())


def is_main_process() -> bool:
    """Global rank 0, as the launchers (torchrun, accelerate, deepspeed) set RANK; no variable: one process."""
    return os.environ.get("RANK", "0") == "0"


def _pid_namespace() -> str:
    """Which pids a pid in the lock means: a holder in another container on this host has its own."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass
class _Held:
    path: Path
    record: dict[str, Any]
    stages: list[str]
    say: Callable[[str], None]
    created_dir: Path | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None
    lost: bool = False


_HELD: dict[Path, _Held] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def writer_lock(run_dir: str | Path, stage: str, say: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run directory's writer's lock for the body (see the module docstring).

    Raises RunLockError when another live writer holds it. Processes other than the main one run the
    body without it; a process that holds it already (``run``'s stages) re-enters.
    """
    if not is_main_process():
        yield
        return
    heartbeat_s(), stale_s()  # a bad setting fails here, not later in the heartbeat thread
    run_dir = Path(run_dir)
    created = None if run_dir.exists() else run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / LOCK_NAME).resolve()
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None:
            held.stages.append(stage)
    if held is not None:
        _write(held)  # the holder's line names the stage running now
        try:
            yield
        finally:
            held.stages.pop()
            _write(held)
        return
    held = _acquire(path, stage, say)
    held.created_dir = created
    with _HELD_GUARD:
        _HELD[path] = held
    held.thread = threading.Thread(target=_beat, args=(held,), name="run-lock-heartbeat", daemon=True)
    held.thread.start()
    try:
        yield
    finally:
        _release(held)


def holder_line(record: dict[str, Any] | None) -> str:
    """The holder in words: host, pid, Slurm job, stage, since when, last heartbeat."""
    if record is None:
        return "an unreadable lock"
    since = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    beat = record.get("heartbeat")
    ago = f", heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
    job = f", Slurm job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}{job}, stage {record.get('stage', '?')}, "
            f"since {when}{ago}")


# ---------------------------------------------------------------- acquiring


def _new_record(stage: str) -> dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None, "stage": stage, "started": now,
            "heartbeat": now, "token": uuid.uuid4().hex}


def _acquire(path: Path, stage: str, say: Callable[[str], None]) -> _Held:
    record = _new_record(stage)
    for _ in range(20):  # each round creates the file, removes a stale one, or refuses
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raw = _read_raw(path)
            if raw is None:  # released between our two calls
                continue
            holder = _parse(raw)
            reason = _stale_reason(holder, path)
            if reason is None:
                raise RunLockError(
                    f"{path.parent} is being written by another process ({holder_line(holder)}); wait for it to "
                    f"finish or stop it (its lock {path} is taken over once that process is gone or its heartbeat "
                    f"is {stale_s():.0f} s old)")
            if _remove_if_unchanged(path, raw):
                say(f"[lock] {path}: taking over a stale writer's lock ({holder_line(holder)}): {reason}")
            else:
                time.sleep(0.05)  # another process is taking it over right now
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for left in path.parent.glob(f".{path.name}.*.tmp"):  # a heartbeat write cut by a kill; ours now
            left.unlink(missing_ok=True)
        return _Held(path=path, record=record, stages=[stage], say=say)
    raise RunLockError(f"{path}: could not take the writer's lock (other processes kept taking it); try again")


def _read_raw(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:  # being written (between O_EXCL and the write), or cut by a crash
        return None
    return record if isinstance(record, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale_reason(holder: dict[str, Any] | None, path: Path) -> str | None:
    """Why the holder is gone, or None while it may still be writing."""
    limit = stale_s()
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        return f"the lock file is unreadable and {age:.0f} s old" if age > limit else None
    job = os.environ.get("SLURM_JOB_ID")
    if job and str(holder.get("slurm_job_id")) == job:
        return f"it is this Slurm job's own ({job}): the job was requeued and restarts"
    pid = holder.get("pid")
    if (holder.get("host") == socket.gethostname() and holder.get("pid_namespace", "") == _pid_namespace()
            and isinstance(pid, int)):
        if pid == os.getpid():  # this process holds nothing there (see _HELD): a pid reused after a restart
            return f"its pid {pid} is this process's, which does not hold it"
        if not _alive(pid):
            return f"process {pid} is gone"
    beat = holder.get("heartbeat")
    age = time.time() - beat if isinstance(beat, (int, float)) else float("inf")
    if age > limit:
        return f"no heartbeat for {age:.0f} s (the limit is {limit:.0f} s, {STALE_ENV})"
    return None


def _remove_if_unchanged(path: Path, raw: bytes) -> bool:
    """Delete the stale lock file if it still holds `raw`, under a takeover guard, so that of two
    processes taking over one stale lock only one removes it (the other would remove the new one)."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > stale_s():  # left by a taker killed mid-takeover
                guard.unlink()
        return False
    os.close(fd)
    try:
        if _read_raw(path) != raw:
            return False
        path.unlink()
        return True
    finally:
        guard.unlink(missing_ok=True)


# ---------------------------------------------------------------- holding and releasing


def _write(held: _Held) -> None:
    """Rewrite the lock with a fresh heartbeat and the current stage, if it is still ours."""
    with held.write_lock:
        if held.lost:
            return
        current = _parse(_read_raw(held.path) or b"")
        if current is None or current.get("token") != held.record["token"]:
            held.lost = True
            held.say(f"warning: {held.path}: this process's writer's lock was taken over "
                     f"({holder_line(current) if current else 'removed'}); another writer may now write "
                     f"{held.path.parent} too")
            return
        held.record["stage"] = " > ".join(held.stages)
        held.record["heartbeat"] = time.time()
        atomic_write_text(held.path, json.dumps(held.record) + "\n")


def _beat(held: _Held) -> None:
    while not held.stop.wait(heartbeat_s()):
        try:
            _write(held)
        except OSError as err:  # a filesystem hiccup: the next beat tries again
            held.say(f"warning: {held.path}: heartbeat not written ({err})")
        if held.lost:
            return


def _release(held: _Held) -> None:
    held.stop.set()
    if held.thread is not None:
        held.thread.join(timeout=10)
    with _HELD_GUARD:
        _HELD.pop(held.path, None)
    with held.write_lock:
        current = _parse(_read_raw(held.path) or b"")
        if not held.lost and current is not None and current.get("token") == held.record["token"]:
            held.path.unlink(missing_ok=True)
    if held.created_dir is not None:
        with contextlib.suppress(OSError):  # made only for the lock, and left empty: leave no trace
            held.created_dir.rmdir()
