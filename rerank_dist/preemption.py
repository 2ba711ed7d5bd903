"""Preemption: a scheduler's warning signal turned into "checkpoint now, then exit for a requeue".

Slurm sends ``SIGUSR1`` some time before it ends a job (``sbatch --signal=USR1@300``: five minutes
before the time limit; with ``PreemptParameters=send_user_signal``, also when the job is preempted).
Every process of the job step receives it: the launcher, torchrun's agent and each worker.

- The launcher and torchrun's agent ignore it (``ignore``): its default action would kill them, and
  an ignored signal stays ignored across exec and in every child, so no worker dies of it either.
- Each worker installs a handler (``install``) that only records the time: acting inside a signal
  handler could stop one rank in the middle of a collective while the others wait for it forever.
- The training loop votes on ``requested()`` with every optimizer step (one all-reduce, any rank's
  yes counts), so all ranks stop after the same step, write that step's checkpoint and raise
  ``Preempted``; the scorer does the same between batches, saving the users it has scored.
- ``Preempted`` ends the process with ``EXIT_REQUEUE`` (75, EX_TEMPFAIL: "try again later"); the
  launcher reports that status for the node, and ``slurm/lib.sh`` turns it into ``scontrol requeue``.
  The requeued job resumes from the checkpoint.

Nothing here talks to other processes, so it is safe to import before torch.
"""

from __future__ import annotations

import signal
import time

EXIT_REQUEUE = 75  # EX_TEMPFAIL (sysexits.h): stopped in a resumable state, run me again
SIGNAL = signal.SIGUSR1

_received_at: float | None = None  # time.monotonic() when the first signal arrived


class Preempted(SystemExit):
    """Raised once the state to resume from is on disk; exits with EXIT_REQUEUE if nothing catches it."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_REQUEUE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _record(signum: int, frame: object) -> None:
    global _received_at
    if _received_at is None:  # a second warning does not reset the clock
        _received_at = time.monotonic()


def install() -> None:
    """Record SIGUSR1 in this process from now on (a worker: train, score, run)."""
    signal.signal(SIGNAL, _record)


def ignore() -> None:
    """Ignore SIGUSR1 in this process and in every process it starts (the launcher, before torchrun)."""
    signal.signal(SIGNAL, signal.SIG_IGN)


def requested() -> bool:
    """Whether this process was told to stop (one vote: the loops combine every rank's)."""
    return _received_at is not None


def seconds_since_signal() -> float | None:
    """Seconds since this process received the signal (None: it did not, another rank did)."""
    return None if _received_at is None else round(time.monotonic() - _received_at, 2)


def reset() -> None:
    """Forget a received signal (tests run several stages in one process)."""
    global _received_at
    _received_at = None


def describe_wait() -> str:
    """' N.N s after the signal' for messages, or '' where this process did not receive it."""
    waited = seconds_since_signal()
    return "" if waited is None else f" {waited:.1f} s after the signal"
