"""A two-node Slurm cluster on this machine, for the Slurm tests (tests/test_slurm.py) and by hand:

    python tests/slurm_cluster.py start /tmp/cluster    # then: export SLURM_CONF=/tmp/cluster/slurm.conf
    python tests/slurm_cluster.py stop /tmp/cluster

Installs Debian's slurm-wlm and munge with apt-get when they are missing, then starts, as root and
with every file in the given directory: munged (its own key copy and socket, so a system munged is
left alone), slurmctld and two slurmd, node1 and node2 (one CPU each, both this host on their own
ports; NodeAddr=127.0.0.1 because the names resolve nowhere). ``stop`` cancels the cluster's jobs,
stops the daemons by the pids in their pid files, then ends the job processes they left, found by
the SLURM_CONF in their environment. Nothing outside the directory is changed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "sacct"]
NODES = ("node1", "node2")
DAEMONS = ("slurmd-node1", "slurmd-node2", "slurmctld", "munged")  # stop order: nodes, controller, munge

SLURM_CONF = """\
# Written by tests/slurm_cluster.py: a throwaway two-node cluster on localhost.
ClusterName=rerank-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={dir}/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=86400
# No slurmdbd here: finished jobs are kept for sacct -c (the job completion log).
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/jobcomp.log
NodeName={node1} NodeHostname=localhost NodeAddr=127.0.0.1 Port={node1_port} CPUs=1 State=UNKNOWN
NodeName={node2} NodeHostname=localhost NodeAddr=127.0.0.1 Port={node2_port} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes={node1},{node2} Default=YES MaxTime=INFINITE State=UP
"""


def unavailable() -> str | None:
    """Why this machine cannot run the test cluster (None: it can, possibly after an apt-get install)."""
    if os.geteuid() != 0:
        return "the Slurm test cluster runs munged, slurmctld and slurmd as root; this is not root"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if shutil.which("apt-get") is None:
        missing = ", ".join(b for b in BINARIES if not shutil.which(b))
        return f"Slurm is not installed ({missing}) and there is no apt-get to install it"
    return None


def install(log=print) -> None:
    """apt-get install slurm-wlm and munge when a binary is missing (an `apt-get update` first if needed)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", *PACKAGES]
    log(f"installing {' '.join(PACKAGES)} with apt-get")
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-500:]}")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run(command: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def environment(directory: Path) -> dict[str, str]:
    """The environment for Slurm commands against this cluster."""
    return {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}


def start(directory: Path, timeout: float = 60) -> dict[str, str]:
    """Start munged, slurmctld and both slurmd with every file under directory; return the environment
    for Slurm commands (SLURM_CONF) once both nodes are idle. Raises RuntimeError with the daemons'
    last log lines otherwise (and stops what was started)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # munged refuses a socket directory others cannot traverse
    for sub in ("state", "log", "spool"):
        (directory / sub).mkdir(exist_ok=True)
    key = directory / "munge.key"
    if not key.exists():
        if Path("/etc/munge/munge.key").is_file():
            shutil.copyfile("/etc/munge/munge.key", key)
        else:
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)  # munged checks that only its owner can read the key
    ctld_port, node1_port, node2_port = _free_ports(3)
    conf = directory / "slurm.conf"
    conf.write_text(SLURM_CONF.format(dir=directory, ctld_port=ctld_port, node1=NODES[0], node2=NODES[1],
                                      node1_port=node1_port, node2_port=node2_port))
    env = environment(directory)
    commands = [
        ["munged", f"--key-file={key}", f"--socket={directory}/munge.socket", f"--pid-file={directory}/munged.pid",
         f"--log-file={directory}/log/munged.log", f"--seed-file={directory}/munged.seed"],
        ["slurmctld", "-f", str(conf)],
        *[["slurmd", "-f", str(conf), "-N", node] for node in NODES],
    ]
    try:
        for command in commands:  # each daemonizes and writes its pid file
            result = _run(command, env)
            if result.returncode != 0:
                raise RuntimeError(f"{command[0]} did not start: {(result.stderr or result.stdout).strip()[-300:]}")
        _wait_idle(env, timeout)
    except BaseException:
        stop(directory)
        raise
    return env


def _wait_idle(env: dict[str, str], timeout: float) -> None:
    deadline = time.time() + timeout
    states = ""
    while time.time() < deadline:
        result = _run(["sinfo", "-h", "-N", "-o", "%N %T"], env)
        states = result.stdout.strip()
        if result.returncode == 0 and sorted(states.splitlines()) == [f"{n} idle" for n in NODES]:
            return
        time.sleep(0.5)
    logs = Path(env["SLURM_CONF"]).parent / "log"
    tails = {p.name: p.read_text().splitlines()[-3:] for p in sorted(logs.glob("*.log"))}
    raise RuntimeError(f"the nodes did not become idle within {timeout:.0f} s (sinfo: {states!r}); logs: {tails}")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (ended, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pids: list[int], grace: float = 10) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _job_processes(conf: Path) -> list[int]:
    """Processes our slurmd started (job steps and their tasks): they carry our SLURM_CONF."""
    marker = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def stop(directory: Path) -> None:
    """Cancel every job, stop the daemons by their pids, then end the job processes they left behind."""
    directory = Path(directory).resolve()
    conf = directory / "slurm.conf"
    env = environment(directory)
    if conf.is_file() and _pid(directory / "slurmctld.pid"):
        try:
            _run(["scancel", "--user", "root"], env, timeout=15)
            deadline = time.time() + 20
            while time.time() < deadline and _run(["squeue", "-h"], env, timeout=15).stdout.strip():
                time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass
    _terminate([p for p in (_pid(directory / f"{d}.pid") for d in DAEMONS) if p and _alive(p)])
    _terminate(_job_processes(conf))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm_cluster.py start|stop DIRECTORY", file=sys.stderr)
        return 2
    action, directory = argv[0], Path(argv[1])
    if action == "stop":
        stop(directory)
        return 0
    reason = unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    install()
    start(directory)
    print(f"export SLURM_CONF={directory.resolve() / 'slurm.conf'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
