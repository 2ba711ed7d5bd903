"""``rerank-dist launch``: start the processes of one node, on CPUs or GPUs, with torchrun underneath.

    rerank-dist launch --nproc-per-node 2 run                     # 2 processes on this machine (CPU: gloo)
    rerank-dist launch run -c configs/qwen3_4b_qlora.yaml         # one process per GPU (nccl)
    rerank-dist launch --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 train -c ...
                                                                  # on each of 2 nodes, R = 0 and 1

Why not ``accelerate launch``: on CPU it starts ONE process whatever ``--num_processes`` says (its
multi-CPU path needs mpirun), and a launcher config can change gradient accumulation or mixed
precision behind the run's config. torchrun starts exactly the processes asked for; the Accelerator
each of them builds reads its rank from torchrun's environment, with ``ACCELERATE_USE_CPU`` set where
there is no GPU (without it, torchrun's CPU processes would each see a world of one). On GPUs
``accelerate launch --multi_gpu`` works as well; it also ends in torchrun.

The config is resolved and the batch plan checked for the whole world (nodes x processes) before
any process starts, so a bad combination fails at once, naming the numbers and a fix.

torchrun's agent runs inside this process (as an exec would, with the same pid, so Ctrl-C and a
scheduler's SIGTERM reach it directly) rather than as ``python -m torch.distributed.run``: torchrun
reports any failed worker as exit status 1, and the Slurm scripts need to tell "stopped for a
preemption, state saved" (``preemption.EXIT_REQUEUE``) from a crash. SIGUSR1, the preemption
warning, is ignored here and in torchrun's agent; the workers install their own handler.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from rerank_dist import preemption

# Stages that may run under several processes. prepare/report run once on the main process; retrieve trains
# on the main process and makes candidates on every one.
MULTI_PROCESS_STAGES = ("run", "train", "score", "export", "prepare", "retrieve", "report", "grid", "tables")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc-per-node", type=int, default=0,
                        help="processes on this node (default: one per visible GPU, else 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    parser.add_argument("--master-addr", default="", help="address of node 0 (several nodes; default: this host)")
    parser.add_argument("--master-port", type=int, default=29500, help="a free port on node 0 (several nodes)")
    parser.add_argument("--cpu", action="store_true", help="run on CPUs (gloo) even where GPUs are visible")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the rerank-dist stage and its arguments, e.g. run -c CONFIG.yaml train.lr=2e-4")


def use_cpu(args: argparse.Namespace) -> bool:
    import torch

    return args.cpu or not torch.cuda.is_available()


def nproc_per_node(args: argparse.Namespace) -> int:
    import torch

    if args.nproc_per_node:
        return args.nproc_per_node
    return 1 if use_cpu(args) else torch.cuda.device_count()


def torchrun_command(args: argparse.Namespace, nproc: int) -> list[str]:
    """The torchrun command line for this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if args.nnodes == 1 and not args.master_addr:
        cmd.append("--standalone")  # a free local port; several single-node jobs may share a machine
    else:
        cmd += [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}",
                f"--master-addr={args.master_addr or '127.0.0.1'}", f"--master-port={args.master_port}"]
    return cmd + ["-m", "rerank_dist.cli", *args.command]


def child_environment(args: argparse.Namespace, nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    if use_cpu(args):
        env["ACCELERATE_USE_CPU"] = "true"
        # torchrun would give each process 1 thread; share the cores instead (those this process may
        # run on: a scheduler's allocation, not the whole machine).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    return env


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the launch arguments themselves, or None."""
    if not args.command or args.command[0] not in MULTI_PROCESS_STAGES:
        return f"launch: expected a stage ({' | '.join(MULTI_PROCESS_STAGES)}) after the launch options"
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        return f"launch: --node-rank {args.node_rank} is not in 0..{args.nnodes - 1} (--nnodes {args.nnodes})"
    if args.nproc_per_node < 0:
        return f"launch: --nproc-per-node must be positive, got {args.nproc_per_node}"
    return None


def run_torchrun(args: argparse.Namespace, nproc: int) -> int:
    """Become torchrun: run its agent in this process and return this node's exit status.

    0 when every worker finished; ``preemption.EXIT_REQUEUE`` when they stopped for a preemption with
    their state saved; otherwise the first failed worker's status (128 + N for a signal N).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    cmd = torchrun_command(args, nproc)
    print(f"launch: {args.nnodes} node(s) x {nproc} process(es); node rank {args.node_rank}; "
          f"{'cpu (gloo)' if use_cpu(args) else 'cuda (nccl)'}", file=sys.stderr, flush=True)
    preemption.ignore()  # before any worker starts: they inherit it until they install their handler
    os.environ.update(child_environment(args, nproc))
    try:
        run(parse_args(cmd[3:]))  # cmd[:3] is "python -m torch.distributed.run"
    except ChildFailedError as err:
        return _failure_status(err)
    except SignalException as err:  # this node was told to stop (SIGTERM, Ctrl-C): workers already ended
        print(f"launch: stopped by signal {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


def _failure_status(err) -> int:
    """This node's exit status from torchrun's record of its failed workers."""
    codes = [failure.exitcode for failure in err.failures.values()]
    # The agent terminates the workers still running once one has exited; after a preemption they
    # had all saved their share already (the save ends with a barrier), so those count as stopped.
    stopped = {preemption.EXIT_REQUEUE, -signal.SIGTERM, -signal.SIGKILL}
    if preemption.EXIT_REQUEUE in codes and set(codes) <= stopped:
        print(f"launch: the workers stopped for a preemption with their state saved; exit status "
              f"{preemption.EXIT_REQUEUE} (requeue the job to resume)", file=sys.stderr, flush=True)
        return preemption.EXIT_REQUEUE
    print(err.format_msg(), file=sys.stderr, flush=True)
    first = min(err.failures.values(), key=lambda failure: failure.timestamp)
    return first.exitcode if first.exitcode > 0 else 128 - first.exitcode
