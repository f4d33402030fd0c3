"""A real single-node Slurm, started in a folder for the tests and stopped after them.

The tests that run workers as Slurm jobs talk to a real ``slurmctld`` and ``slurmd`` on this
machine, not to a mock: ``sbatch``, ``squeue`` and ``scancel`` behave exactly as on a cluster.
``slurm_cluster(folder)`` starts munge, the controller and the node daemon as child processes
of the test process, waits until the node is idle, and stops them all afterwards.

Decisions, and why:

- Debian's packages (``apt-get install -y slurmctld slurmd slurm-client munge``), never
  installed by the tests themselves: installing is the machine's business (root, network). Where
  a binary is missing the fixture skips and names that command.
- Everything lives in the folder: munge's key (random bytes written here, mode 0400, not
  ``/etc/munge``), its socket, the ``slurm.conf``, the state, spool, log and pid files. Two
  clusters (two test runs at once) share nothing but the machine; nothing under ``/etc`` is written
  (Slurm still reads Debian's empty ``/etc/slurm/plugstack.conf``, munged ``/etc/group``).
  ``AuthInfo=socket=`` points Slurm's munge plugin, in the daemons and in the client commands
  alike, at the folder's munge socket.
- The ports (``SlurmctldPort``, ``SlurmdPort``) are chosen free at start, for the same reason.
- The daemons run in the foreground (``-D``) as child processes, so that the fixture owns them
  (their pids, their end) and their command lines name the folder (``-f FOLDER/slurm.conf``):
  ``pgrep -f FOLDER`` finds whatever is left of a cluster.
- ``SLURM_CONF`` points the client commands at the folder's configuration; it is set in this
  process's environment for the duration (so that children, dask-jobqueue's ``sbatch`` among
  them, inherit it) and restored afterwards. ``SlurmInfo.env`` holds the same for explicit use.
- No cgroups (``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``): the tests need
  no confinement, and the cgroup plugins fail here (see below).
- munged runs with ``--force``: it refuses a socket whose parent folders not everyone may enter,
  and pytest's temporary folders are private (0700). Forced, it only warns; every client here is
  root, so nothing is lost. The socket's own folder is 0755, the key 0400.
- ``MailProg=/bin/true``: the controller logs an error at every start where ``mail`` is missing.
- ``SelectType=select/cons_tres`` with ``CR_Core_Memory`` and ``DefMemPerCPU`` set to the
  node's memory over its CPUs: without a default, a job with no ``--mem`` is given the whole
  node's memory and jobs run one at a time although CPUs are free.
- ``RealMemory`` a little below the machine's (95 %): a node that reports less memory than its
  configuration says is drained ("Low RealMemory"), and the kernel's figure moves a little.
- ``ReturnToService=2`` and short timeouts: the node comes up ``idle`` as soon as it registers,
  a completed job leaves ``squeue`` after two seconds (``MinJobAge``), and a cancelled job's
  processes are killed after two seconds (``KillWait``).
- ``stop()`` cancels every job first and waits for ``squeue`` to empty, so that no job's
  processes outlive the daemons (``slurmstepd`` is detached from ``slurmd``; stopping ``slurmd``
  alone leaves running jobs running); then SIGTERM to slurmd, slurmctld and munged, SIGKILL to
  any still alive after a few seconds, and a last sweep of any process that still carries the
  folder's ``SLURM_CONF`` in its environment.

Tested with Slurm 22.05.8 and munge 0.5.15 (Debian 12), as root, on two cores. Starting takes
1.06 s to an idle node, stopping 0.13 s with no job left and 0.34 s with a running job to cancel
(five starts, each the same to 0.01 s).

What did not work here: ``proctrack/cgroup`` with ``task/cgroup`` (Slurm's defaults on many
clusters): this machine mounts cgroup v1 and v2 side by side, and every job step failed with
"cgroup namespace 'freezer' not mounted" in ``slurmd.log`` (``srun hostname`` printed nothing).
A cluster that needs cgroups for its tests would need a ``cgroup.conf`` in the folder naming the
hierarchy; these tests do not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: The command that installs what the fixture needs (Debian and Ubuntu).
INSTALL = "apt-get install -y slurmctld slurmd slurm-client munge"

#: The binaries the fixture runs; any one missing skips the tests that need a cluster.
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "scancel", "srun", "sbatch")

#: dask-jobqueue's configuration for this cluster, as users keep it (``jobqueue.yaml`` in a
#: ``DASK_CONFIG`` folder): the scheduler and the workers on 127.0.0.1, the node's address.
JOBQUEUE_YAML = """\
jobqueue:
  slurm:
    scheduler-options:
      host: 127.0.0.1
    worker-extra-args: ["--host", "127.0.0.1"]
"""

#: The partition jobs go to.
PARTITION = "debug"

#: Seconds a cluster has to reach an idle node before the start fails.
START_TIMEOUT = 60.0

#: Seconds a daemon has between SIGTERM and SIGKILL.
TERM_GRACE = 5.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login shell's PATH may lack.
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


def missing_binaries() -> list[str]:
    """The names in ``BINARIES`` that are not on ``PATH`` (or in ``/usr/sbin``)."""
    return [name for name in BINARIES if _which(name) is None]


def _binary(name: str) -> str:
    found = _which(name)
    assert found is not None, name  # missing_binaries() was checked first
    return found


def node_memory_mb() -> int:
    """The machine's memory in MB, from ``/proc/meminfo`` (what ``slurmd`` reports)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


@dataclass
class SlurmInfo:
    """A running single-node Slurm: where it lives and how to talk to it.

    Attributes
    ----------
    folder : Path
        The folder that holds its configuration, state, logs and munge's key and socket.
    env : dict
        The environment to run Slurm's commands with (this process's, plus ``SLURM_CONF``).
    partition : str
        The partition jobs go to.
    cpus : int
        The node's CPUs.
    memory_mb : int
        The node's memory as configured (``RealMemory``), in MB.
    node : str
        The node's name (the machine's short hostname).
    processes : dict
        The daemons still running, by name (``munged``, ``slurmctld``, ``slurmd``).
    """

    folder: Path
    env: dict
    partition: str
    cpus: int
    memory_mb: int
    node: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def conf(self) -> Path:
        """The cluster's ``slurm.conf``."""
        return self.folder / "slurm.conf"

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster; raise with its output where it fails."""
        done = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {done.returncode}: {(done.stderr + done.stdout).strip()}"
            )
        return done

    def squeue_jobs(self) -> list[str]:
        """The ids of the jobs still pending, running or completing."""
        out = self.run("squeue", "--noheader", "--format=%i").stdout
        return out.split()

    def logs(self) -> str:
        """The daemons' logs, each under its name, for a failure's message."""
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            for path in (self.folder / "log" / f"{name}.out", self.folder / "log" / f"{name}.log"):
                if path.exists():
                    text = path.read_text(errors="replace")
                    parts.append(f"--- {path.name} ---\n{text[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged, and wait until they are gone.

        Jobs go first, while the controller still runs: ``slurmstepd`` is detached from
        ``slurmd``, so a job's processes would outlive the daemons. Each daemon gets SIGTERM,
        then SIGKILL after ``TERM_GRACE`` seconds. Safe to call twice.
        """
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                jobs = self.squeue_jobs()
                if jobs:
                    self.run("scancel", *jobs)
                deadline = time.monotonic() + 30
                while self.squeue_jobs() and time.monotonic() < deadline:
                    time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is not None:
                _terminate(process)
        for pid in processes_with(f"SLURM_CONF={self.conf}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _terminate(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(TERM_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def processes_with(entry: str) -> list[int]:
    """Pids of this machine's processes whose environment holds ``entry`` (``NAME=value``)."""
    wanted = entry.encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if wanted in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


def slurm_conf(
    folder: Path, node: str, cpus: int, memory_mb: int, ctld_port: int, slurmd_port: int
) -> str:
    """The text of a ``slurm.conf`` for one node on 127.0.0.1 with every path in ``folder``."""
    return f"""\
ClusterName=virnuc{ctld_port}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/run/slurmctld.pid
SlurmdPidFile={folder}/run/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={memory_mb // cpus}
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=10
MessageTimeout=10
InactiveLimit=0
KillWait=2
MinJobAge=2
Waittime=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _start_munge(folder: Path, env: dict) -> subprocess.Popen:
    munge = folder / "munge"
    # munged refuses a socket folder that not everyone may enter (clients of any user
    # connect to it); the key stays readable by root alone.
    munge.mkdir()
    munge.chmod(0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = munge / "munge.socket"
    out = open(folder / "log" / "munged.out", "wb")  # noqa: SIM115 (the child holds it)
    with out:
        process = subprocess.Popen(
            [
                _binary("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={folder}/run/munged.pid",
                f"--seed-file={munge}/munged.seed",
                f"--log-file={folder}/log/munged.log",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    # The socket appears once munged is ready; the controller fails to start without it.
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            _terminate(process)
            text = (folder / "log" / "munged.out").read_text(errors="replace")
            raise RuntimeError(f"munged did not start (exit {process.poll()}):\n{text}")
        time.sleep(0.05)
    return process


def _start_daemon(name: str, info: SlurmInfo) -> subprocess.Popen:
    out = open(info.folder / "log" / f"{name}.out", "wb")  # noqa: SIM115 (the child holds it)
    with out:
        return subprocess.Popen(
            [_binary(name), "-D", "-f", str(info.conf)],
            env=info.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_idle(info: SlurmInfo, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        for name, process in info.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited {process.returncode}:\n{info.logs()}")
        done = subprocess.run(
            ["sinfo", "--noheader", "--nodes", info.node, "--format=%T"],
            env=info.env,
            capture_output=True,
            text=True,
            check=False,
        )
        state = done.stdout.strip()
        if done.returncode == 0 and state == "idle":
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"node {info.node} not idle after {timeout} s (state {state!r}):\n{info.logs()}"
    )


@contextlib.contextmanager
def slurm_cluster(folder: Path, timeout: float = START_TIMEOUT) -> Iterator[SlurmInfo]:
    """Start a single-node Slurm in ``folder``; yield its ``SlurmInfo``; stop it at the end.

    Parameters
    ----------
    folder : Path
        An empty folder for the cluster's files (a test's ``tmp_path``).
    timeout : float
        Seconds the node has to come up ``idle``.

    Yields
    ------
    SlurmInfo
        The running cluster. ``SLURM_CONF`` names its configuration in this process's
        environment until the end, so that ``sbatch`` run by any library finds it.

    Notes
    -----
    Skips the calling test (``pytest.skip``) where Slurm or munge is not installed, naming the
    command that installs them; it never installs them itself.
    """
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)}): run {INSTALL}")
    folder = Path(folder).resolve()
    for sub in ("state", "spool", "log", "run"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    memory_mb = node_memory_mb() * 95 // 100
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, node, cpus, memory_mb, free_port(), free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    info = SlurmInfo(folder, env, PARTITION, cpus, memory_mb, node)
    saved = os.environ.get("SLURM_CONF")
    try:
        info.processes["munged"] = _start_munge(folder, env)
        info.processes["slurmctld"] = _start_daemon("slurmctld", info)
        info.processes["slurmd"] = _start_daemon("slurmd", info)
        _wait_idle(info, timeout)
        os.environ["SLURM_CONF"] = str(conf)
        yield info
    finally:
        info.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
