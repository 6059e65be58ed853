"""A real two-node Slurm cluster for the tests: the `slurm_cluster` session fixture and helpers around it.

The cluster itself is `scripts/slurm_local.sh` (munged, slurmctld on a bridge, slurmd "nodes" n1/n2 in network
namespaces). The fixture brings it up once per session and always tears it down (stops daemons by their PID files,
deletes the namespaces), also when tests fail or the session is interrupted with Ctrl-C / SIGTERM; `up` itself
first cleans whatever an earlier, killed session left behind. It skips, with the reason, when not root, when
network namespaces are not permitted, or when slurm-wlm/munge cannot be installed; any other failure to start is
an error, not a skip.

Use (in a test module):  from slurm_harness import slurm_cluster  # noqa: F401
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
VENV_BIN = REPO / ".venv" / "bin"
# exit codes of `slurm_local.sh up` that mean "this machine cannot host the cluster" (skip, not fail)
SKIP_CODES = {3: "slurm-wlm/munge missing and cannot be installed", 4: "ip netns not permitted", 5: "not root"}
UP_TIMEOUT_S = 300  # includes an apt-get install on a fresh machine
DOWN_TIMEOUT_S = 120
# The bridge/namespace names are machine-wide: one session at a time holds this lock (see slurm_local.sh).
LOCK = Path(os.environ.get("ARC_SLURM_LOCK", "/run/lock/arc-slurm-local.lock"))
LOCK_WAIT_S = float(os.environ.get("ARC_SLURM_LOCK_WAIT_S", 480))


def _skip(reason: str) -> None:
    print(f"\nslurm_cluster: SKIP: {reason}", file=sys.stderr, flush=True)
    pytest.skip(reason)


def _script_env(state_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(SLURM_LOCAL=str(state_dir), ARC_SLURM_LOCK=str(LOCK), ARC_SLURM_LOCK_HELD="1")
    return env


def job_env(conf: Path, **extra: str) -> dict:
    """Environment for sbatch/srun/scontrol against the local cluster; sbatch exports it into the job.
    The child-process environment of every other multi-process test (CPU, one thread per rank, offline hub, cached
    DeepSpeed op builds), without the caller's Slurm variables and with the cluster's config."""
    from helpers import child_env

    env = {k: v for k, v in child_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "ARC_"))}
    python_bin = Path(sys.executable).parent  # the jobs run in the environment running the tests
    env.update(
        SLURM_CONF=str(conf),
        PATH=os.pathsep.join(dict.fromkeys([str(python_bin), str(VENV_BIN), *env["PATH"].split(os.pathsep)])),
        ARC_PYTHON=sys.executable,
    )
    env.update(extra)
    return env


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")


def timeline(info: dict[str, str]) -> str:
    return " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Restarts", "SubmitTime", "StartTime", "EndTime"))


@dataclass
class SlurmCluster:
    state_dir: Path
    conf: Path
    nodes: tuple[str, ...] = ("n1", "n2")
    submitted: list[str] = field(default_factory=list)

    def env(self, **extra: str) -> dict:
        return job_env(self.conf, **extra)

    def run(self, *cmd: str, timeout: float = 30, check: bool = True, env: dict | None = None):
        proc = subprocess.run(list(cmd), env=env or self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
                                 f"{self.daemon_logs()}")
        return proc

    def sbatch(self, script: str | Path, *args: str, options: tuple[str, ...] = (), env: dict | None = None,
               wait: bool = False, timeout: float = 60) -> tuple[str, int]:
        """Submit; returns (job id, sbatch's exit code). With wait=True, sbatch --wait: the job's exit code."""
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *options, str(script), *args]
        proc = subprocess.Popen(cmd, env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            job = (out or "").strip().split(";")[0]
            if job:
                self.run("scancel", job, check=False)
            raise AssertionError(f"sbatch {'--wait ' if wait else ''}{script} did not finish in {timeout}s "
                                 f"(job {job or '?'})\n{self.job_info(job) if job else ''}\n{self.daemon_logs()}")
        job = out.strip().split("\n")[0].split(";")[0]
        if not job:
            raise AssertionError(f"sbatch {script} gave no job id (exit {proc.returncode}): {err}")
        self.submitted.append(job)
        return job, proc.returncode

    def job_info(self, job: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict ({} when the job is unknown)."""
        proc = self.run("scontrol", "-o", "show", "job", job, check=False, timeout=15)
        if proc.returncode != 0:
            return {}
        info = {}
        for token in re.findall(r"(\w+)=(\S*)", proc.stdout):
            info.setdefault(token[0], token[1])
        return info

    def wait_job_done(self, job: str, timeout: float) -> dict[str, str]:
        """Wait until the job is in a final state (a requeued job passes through PENDING again)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(0.5)
        self.run("scancel", job, check=False)
        raise AssertionError(f"job {job} not finished after {timeout}s: {info}\n{self.daemon_logs()}")

    def submit_and_wait(self, script: str | Path, *args: str, options: tuple[str, ...] = (),
                        env: dict | None = None, timeout: float = 240) -> tuple[str, int, dict[str, str]]:
        """Like `sbatch --wait` (whose polling backs off to 10 s) but polling every 0.5 s: (job, exit code, info)."""
        job, rc = self.sbatch(script, *args, options=options, env=env)
        assert rc == 0, f"sbatch {script} exited {rc}"
        info = self.wait_job_done(job, timeout)
        code, _, sig = info.get("ExitCode", "255:0").partition(":")
        return job, int(code) if code != "0" or sig in ("", "0") else 128 + int(sig), info

    def signal_batch(self, job: str, sig: str = "USR1") -> None:
        """What the time-limit warning does: the signal to the batch shell only."""
        self.run("scancel", "--batch", f"--signal={sig}", job)

    def daemon_logs(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.state_dir / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name} ---\n" + "\n".join(tail))
        return "\n".join(out)


class _Lifecycle:
    """Runs `slurm_local.sh down` exactly once, whichever way the session ends."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.done = False
        self._previous_term = None
        self._lock_file = None

    def lock(self) -> bool:
        """Wait (bounded) for other sessions on this machine to give the cluster back."""
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(LOCK, "a")
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock_file.close()
                    self._lock_file = None
                    return False
                time.sleep(2)

    def up(self) -> subprocess.CompletedProcess:
        atexit.register(self.down)
        try:
            self._previous_term = signal.signal(signal.SIGTERM, self._on_term)
        except ValueError:  # not the main thread
            self._previous_term = None
        return subprocess.run(["bash", str(SCRIPT), "up"], env=_script_env(self.state_dir), capture_output=True,
                              text=True, timeout=UP_TIMEOUT_S)

    def _on_term(self, signum, frame):  # a killed pytest still tears the cluster down (via the finalizers)
        raise KeyboardInterrupt(f"signal {signum}")

    def down(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            proc = subprocess.run(["bash", str(SCRIPT), "down"], env=_script_env(self.state_dir), capture_output=True,
                                  text=True, timeout=DOWN_TIMEOUT_S)
            if proc.returncode != 0:
                print(f"slurm_local.sh down exited {proc.returncode}: {proc.stderr}", file=sys.stderr)
        finally:
            if self._lock_file is not None:
                self._lock_file.close()  # releases the flock
                self._lock_file = None
            if self._previous_term is not None:
                signal.signal(signal.SIGTERM, self._previous_term)
                self._previous_term = None


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.name != "posix" or os.geteuid() != 0:
        _skip("the local Slurm cluster needs root (network namespaces, munge, slurmd)")
    for tool in ("ip", "nsenter", "unshare", "runuser"):
        if shutil.which(tool) is None:
            _skip(f"{tool} is not installed")
    state_dir = Path(os.environ.get("SLURM_LOCAL", REPO / ".slurm-local")).resolve()
    life = _Lifecycle(state_dir)
    if not life.lock():
        _skip(f"another session on this machine held {LOCK} (the local Slurm cluster) for {LOCK_WAIT_S:.0f}s")
    try:
        proc = life.up()
    except subprocess.TimeoutExpired:
        life.down()
        pytest.fail(f"scripts/slurm_local.sh up did not finish in {UP_TIMEOUT_S}s")
    if proc.returncode in SKIP_CODES:
        life.down()
        _skip(f"{SKIP_CODES[proc.returncode]}: {proc.stderr.strip()[-500:]}")
    cluster = SlurmCluster(state_dir=state_dir, conf=state_dir / "slurm.conf")
    if proc.returncode != 0:
        logs = cluster.daemon_logs()
        life.down()
        pytest.fail(f"scripts/slurm_local.sh up exited {proc.returncode}:\n{proc.stderr}\n{logs}")
    try:
        yield cluster
    finally:
        life.down()
