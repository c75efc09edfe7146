"""The local single-node Slurm (workflow/scripts/local-slurm.sh) that the Slurm tests run on."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.slurm import SCRIPT, LocalSlurm, os_release_ids, skip_reason_for_start_failure

pytestmark = pytest.mark.slurm


def submit(cluster: LocalSlurm, *arguments: str) -> str:
    """sbatch into the local partition and account; return the job id."""
    completed = subprocess.run(
        ["sbatch", "--parsable", "--partition", cluster.partition, "--account", cluster.account,
         *arguments],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return completed.stdout.strip().split(";")[0]


def scontrol_config() -> dict[str, str]:
    """`scontrol show config` as {key: value}."""
    output = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                            timeout=60, check=True).stdout
    config = {}
    for line in output.splitlines():
        key, separator, value = line.partition(" = ")
        if separator:
            config[key.strip()] = value.strip()
    return config


def test_sinfo_lists_the_node_idle_with_every_cpu(local_slurm):
    node = socket.gethostname().split(".")[0]
    deadline = time.monotonic() + 60
    while True:
        lines = subprocess.run(
            ["sinfo", "-h", "-N", "-p", local_slurm.partition, "-o", "%N|%T|%c"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.split()
        # a node finishing earlier tests' jobs shows `completing` for a moment
        if lines and lines[0].split("|")[1] == "idle" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert lines == [f"{node}|idle|{len(os.sched_getaffinity(0))}"]


def test_a_job_completes_with_exit_code_zero(local_slurm, tmp_path):
    output = tmp_path / "hello.out"
    job_id = submit(local_slurm, "--output", str(output), "--wrap", "echo hello from $SLURM_JOB_ID")
    assert local_slurm.sacct_records([job_id]) == {job_id: ("COMPLETED", "0:0")}
    assert output.read_text() == f"hello from {job_id}\n"


def test_a_job_that_exits_3_is_failed_3(local_slurm, tmp_path):
    job_id = submit(local_slurm, "--output", str(tmp_path / "exit.out"), "--wrap", "exit 3")
    assert local_slurm.sacct_records([job_id]) == {job_id: ("FAILED", "3:0")}
    assert local_slurm.sacct_states([job_id]) == {job_id: "FAILED"}


def test_two_one_cpu_jobs_run_side_by_side(local_slurm, tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: two one-CPU jobs cannot run side by side")
    job_ids = [
        submit(local_slurm, "--cpus-per-task", "1", "--output", str(tmp_path / f"{index}.out"),
               "--wrap", "sleep 3")
        for index in range(2)
    ]
    assert local_slurm.sacct_states(job_ids) == dict.fromkeys(job_ids, "COMPLETED")
    rows = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "Start,End", "-j", ",".join(job_ids)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    intervals = [[datetime.fromisoformat(stamp) for stamp in row.split("|")] for row in rows]
    (first_start, first_end), (second_start, second_end) = intervals
    assert max(first_start, second_start) < min(first_end, second_end)  # they overlapped


def test_an_unknown_account_is_refused(local_slurm):
    completed = subprocess.run(
        ["sbatch", "--partition", local_slurm.partition, "--account", "no-such-account",
         "--wrap", "true"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert completed.returncode != 0
    assert "Invalid account" in completed.stderr


def test_the_configuration_tracks_jobs_without_cgroups(local_slurm):
    config = scontrol_config()
    assert config["ProctrackType"] == "proctrack/linuxproc"
    assert config["TaskPlugin"] == "task/none"
    assert config["EnforcePartLimits"] == "ALL"
    assert config["SelectTypeParameters"] == "CR_CORE_MEMORY"
    assert config["AccountingStorageType"] == "accounting_storage/slurmdbd"
    assert config["ClusterName"] == local_slurm.cluster
    assert int(config["DefMemPerCPU"]) > 0


def test_slurmdbd_conf_is_private_to_the_slurm_user(local_slurm):
    status = Path("/etc/slurm/slurmdbd.conf").stat()
    assert status.st_mode & 0o777 == 0o600
    assert pwd.getpwuid(status.st_uid).pw_name == "slurm"


def test_munged_runs_as_munge(local_slurm):
    pid = int(Path("/run/munge/munged.pid").read_text())
    uid_line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Uid:"))
    real_uid, effective_uid = (int(value) for value in uid_line.split()[1:3])
    assert real_uid == effective_uid == pwd.getpwnam("munge").pw_uid


def test_the_script_refuses_to_run_without_root():
    command = ["bash", str(SCRIPT), "start"]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "nobody", "--", *command]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        "local-slurm.sh: error: must run as root (it installs packages and starts daemons)"
    ]


def test_the_script_names_its_usage():
    completed = subprocess.run(["bash", str(SCRIPT), "restart"], capture_output=True, text=True,
                               timeout=60, check=False)
    assert completed.returncode == 2
    assert completed.stderr.strip() == "usage: local-slurm.sh start | stop | status"


def test_an_unreachable_archive_is_named_and_skips(tmp_path):
    if os.geteuid() != 0 or not os_release_ids() & {"debian", "ubuntu"}:
        pytest.skip("the script reaches apt-get only as root on Debian or Ubuntu")
    # apt with no installed packages, no package lists and an archive that refuses connections;
    # the script sees no Slurm binaries on a PATH without the sbin folders and runs apt-get
    for folder in ("lists/partial", "cache/archives/partial", "parts", "state"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "status").write_text("")
    (tmp_path / "sources.list").write_text("deb http://127.0.0.1:9/debian bookworm main\n")
    settings = {
        "Dir::State": "state", "Dir::State::lists": "lists", "Dir::State::status": "status",
        "Dir::Cache": "cache", "Dir::Etc::sourcelist": "sources.list",
        "Dir::Etc::sourceparts": "parts",
    }
    (tmp_path / "apt.conf").write_text(
        "".join(f'{key} "{tmp_path / value}";\n' for key, value in settings.items())
    )
    completed = subprocess.run(
        ["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "APT_CONFIG": str(tmp_path / "apt.conf"), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 1
    error = completed.stderr.strip().splitlines()[-1]
    assert error.startswith("local-slurm.sh: error: apt-get cannot reach the package archive (")
    assert "127.0.0.1:9" in error
    reason = skip_reason_for_start_failure(completed.stdout + completed.stderr)
    assert reason == f"local Slurm: apt cannot install the packages from its archive: {error}"


@pytest.mark.parametrize(
    ("output", "skips"),
    [
        (("local-slurm.sh: installing slurm-wlm slurmdbd munge mariadb-server\n"
          "local-slurm.sh: error: apt-get cannot reach the package archive (W: Failed to fetch "
          "http://deb.debian.org/debian/dists/bookworm/InRelease; log: /tmp/x.log)"), True),
        (("local-slurm.sh: error: apt-get could not install slurm-wlm slurmdbd munge "
          "mariadb-server (E: Could not get lock /var/lib/dpkg/lock-frontend; log: /tmp/x.log)"),
         False),
        (("local-slurm.sh: error: /etc/slurm/slurm.conf exists and was not written by this "
          "script; move it away to use a local Slurm"), True),
        (("local-slurm.sh: munged answers\n"
          "local-slurm.sh: error: slurmctld does not answer (last line of log: fatal)"), False),
    ],
)
def test_only_what_the_machine_lacks_skips(output, skips):
    reason = skip_reason_for_start_failure(output)
    assert (reason is not None) == skips
    if skips:
        assert reason.endswith(output.splitlines()[-1].strip())
