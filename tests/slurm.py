"""A real single-node Slurm for the tests: `local_slurm` runs workflow/scripts/local-slurm.sh.

The fixture needs root on Debian or Ubuntu (the script installs slurm-wlm, slurmdbd, munge and
mariadb-server with apt-get and starts the daemons). Elsewhere, or where apt cannot reach its
archive, it skips and the skip says why; any other failure to start is a test error, never a pass.
A Slurm that this fixture started is stopped at the end of the session; one that already ran is
left running.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "local-slurm.sh"
# what local-slurm.sh sets up
CLUSTER = "dynomp"
PARTITION = "debug"
ACCOUNT = "dynomp"
START_TIMEOUT_SECONDS = 900
# states after which a job changes no more (sacct's names)
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT",
})


@dataclass(frozen=True)
class LocalSlurm:
    """The running local cluster: where to submit, and how to read job states from sacct."""

    partition: str = PARTITION
    account: str = ACCOUNT
    cluster: str = CLUSTER

    def sacct_records(
        self, job_ids: Iterable[str | int], *, timeout_seconds: float = 120.0
    ) -> dict[str, tuple[str, str]]:
        """{job id: (state, exit code)} from sacct, waiting until every job reached a final state.

        Job ids may be plain (``12``) or array elements (``12_0``); sacct records a job a moment
        after it ends, so this polls until all are final or the timeout passes (then returns what
        sacct says, pending states included, for the caller to assert on).
        """
        wanted = [str(job_id) for job_id in job_ids]
        deadline = time.monotonic() + timeout_seconds
        records: dict[str, tuple[str, str]] = {}
        while True:
            completed = subprocess.run(
                ["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(wanted)],
                capture_output=True, text=True, timeout=60, check=False,
            )
            if completed.returncode == 0:
                for line in completed.stdout.splitlines():
                    job_id, state, exit_code = line.split("|")
                    # "CANCELLED by 0" -> CANCELLED
                    records[job_id] = (state.split()[0] if state else state, exit_code)
            done = all(records.get(job_id, ("",))[0] in FINAL_STATES for job_id in wanted)
            if done or time.monotonic() > deadline:
                return {job_id: records.get(job_id, ("MISSING", "")) for job_id in wanted}
            time.sleep(0.5)

    def sacct_states(
        self, job_ids: Iterable[str | int], *, timeout_seconds: float = 120.0
    ) -> dict[str, str]:
        """{job id: state} from sacct, once every job reached a final state (or the timeout)."""
        records = self.sacct_records(job_ids, timeout_seconds=timeout_seconds)
        return {job_id: state for job_id, (state, _) in records.items()}


def os_release_ids(path: Path = Path("/etc/os-release")) -> set[str]:
    """The ID and ID_LIKE words of /etc/os-release (empty when it is missing)."""
    if not path.is_file():
        return set()
    words: set[str] = set()
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        if key in ("ID", "ID_LIKE"):
            words.update(value.strip().strip("\"'").split())
    return words


def last_error_line(output: str) -> str:
    """The script's last `error:` line (or its last line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or ["(no output)"])[-1]


def skip_reason_for_start_failure(output: str) -> str | None:
    """A skip reason when the machine cannot have a local Slurm; None for a failure to report.

    Two causes are the machine's, not the code's: apt cannot get the packages from its archive,
    and a Slurm configuration the script did not write (a real cluster node), which it leaves alone.
    """
    line = last_error_line(output)
    if "apt-get cannot reach the package archive" in line:
        return f"local Slurm: apt cannot install the packages from its archive: {line}"
    if "was not written by this script" in line:
        return f"local Slurm: this machine has its own Slurm configuration: {line}"
    return None


def _run_script(action: str, *, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[LocalSlurm]:
    """A running single-node Slurm with accounting (started here unless it already ran)."""
    if os.geteuid() != 0:
        pytest.skip(f"local Slurm: needs root to install and start the daemons ({SCRIPT.name})")
    ids = os_release_ids()
    if not ids & {"debian", "ubuntu"}:
        found = " ".join(sorted(ids)) or "missing"
        pytest.skip(f"local Slurm: needs Debian or Ubuntu (/etc/os-release: {found})")
    already_running = _run_script("status", timeout=60).returncode == 0
    if not already_running:
        started = _run_script("start", timeout=START_TIMEOUT_SECONDS)
        if started.returncode != 0:
            output = started.stdout + started.stderr
            # stop what did start before the failure
            _run_script("stop", timeout=300)
            reason = skip_reason_for_start_failure(output)
            if reason is not None:
                pytest.skip(reason)
            pytest.fail(f"{SCRIPT.name} start failed: {last_error_line(output)}", pytrace=False)
    try:
        yield LocalSlurm()
    finally:
        if not already_running:
            stopped = _run_script("stop", timeout=300)
            assert stopped.returncode == 0, f"{SCRIPT.name} stop: {last_error_line(stopped.stderr)}"
