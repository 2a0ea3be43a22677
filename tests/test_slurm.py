"""``launchers/slurm.sbatch`` on a real Slurm: a one-node cluster on the loopback (slurmctld, slurmd,
munge with a fresh key; ``launchers/ci_slurm.sh``) started for this module and stopped after it.

The job is the sbatch script as users submit it, with the CPU sizes of this machine given on the
sbatch command line (1 node, 2 CPUs, no GPUs) and NPROC_PER_NODE=2: one torchrun per node via srun,
c10d rendezvous on the first node of the allocation, 2 processes with cp=2. Checked: the job's state
and exit code from ``scontrol show job`` (no accounting daemon here, so no ``sacct``), its output and
its metrics.jsonl; a job with an impossible configuration must end FAILED with a non-zero exit code.

Slurm must be installed (``bash launchers/ci_slurm.sh install``); without it the tests fail and say
so, they do not skip. Needs root (the daemons and the job run as root, as in a CI container).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.netns import teardown_on_sigterm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launchers", "ci_slurm.sh")
FAST = ["trainer.steps=4", "trainer.warmup_steps=1", "trainer.log_every=1", "trainer.ckpt_every=2",
        "trainer.micro_batch=4", "trainer.tensorboard=false", "trainer.progress=false", "data.seq_len=32"]
JOB_TIMEOUT_S = 180
PENDING_LIMIT_S = 30


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"Slurm is not installed (missing {missing}): the sbatch launcher is tested on a real local "
                    f"cluster. Fix: bash launchers/ci_slurm.sh install  (apt-get install -y --no-install-recommends "
                    f"slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.fail(f"the local Slurm cluster runs its daemons as root, got uid {os.geteuid()}. Fix: run as root")
    state = str(tmp_path_factory.mktemp("slurm") / "cluster")
    env = dict(os.environ)
    env.pop("SLURM_CONF", None)
    # clusters of earlier sessions that were killed before their teardown (SIGKILL): stop them
    owners = {os.path.realpath(p) for p in
              glob.glob(str(tmp_path_factory.getbasetemp().parent / "*" / "slurm*" / "cluster.owner"))}
    for owner in sorted(owners):
        with open(owner) as f:
            pid = int(f.read().strip() or 0)
        if pid and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["bash", SCRIPT, "stop", owner[:-len(".owner")]], capture_output=True, timeout=120, env=env)
            os.remove(owner)
    with teardown_on_sigterm():
        try:
            with open(state + ".owner", "w") as f:
                f.write(str(os.getpid()))
            res = subprocess.run(["bash", SCRIPT, "start", state], capture_output=True, text=True, timeout=120,
                                 env=env)
            assert res.returncode == 0, f"ci_slurm.sh start failed:\n{res.stdout}\n{res.stderr}"
            yield dict(env, SLURM_CONF=os.path.join(state, "slurm.conf"))
        finally:
            subprocess.run(["bash", SCRIPT, "stop", state], capture_output=True, text=True, timeout=120, env=env)
            os.remove(state + ".owner")


def _job(env: dict, job: str) -> dict:
    show = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True,
                          timeout=30, check=True).stdout
    return dict(kv.split("=", 1) for kv in show.split() if "=" in kv)


def _submit(slurm_env: dict, out_dir: str, overrides: list[str]) -> tuple[str, dict, str]:
    """``sbatch launchers/slurm.sbatch OVERRIDES``, then poll the job until it ends: returns (job id,
    its ``scontrol show job`` fields, its output). A job that is still pending after PENDING_LIMIT_S
    (a node or partition that cannot run it) or not done after JOB_TIMEOUT_S is cancelled and fails."""
    env = dict(slurm_env, NPROC_PER_NODE="2", RDZV_PORT=str(_free_port()), DIST_ATTN_PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    out = os.path.join(out_dir, "slurm-%j.out")
    cmd = ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=00:05:00",
           f"--output={out}", "launchers/slurm.sbatch", f"trainer.out_dir={out_dir}", *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    job = res.stdout.strip().split(";")[0]
    assert res.returncode == 0 and re.fullmatch(r"\d+", job), f"sbatch failed: {res.stdout!r} {res.stderr!r}"
    start = time.monotonic()
    while True:
        fields = _job(env, job)
        waited = time.monotonic() - start
        state = fields["JobState"]
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            break
        if (state == "PENDING" and waited > PENDING_LIMIT_S) or waited > JOB_TIMEOUT_S:
            subprocess.run(["scancel", job], env=env, timeout=30)
            raise AssertionError(f"Slurm job {job} still {state} (Reason={fields.get('Reason')}) after {waited:.0f} s; "
                                 f"node: {subprocess.run(['scontrol', 'show', 'node', 'localhost'], env=env, text=True, capture_output=True).stdout}")
        time.sleep(0.5)
    with open(out.replace("%j", job)) as f:
        output = f.read()
    return job, fields, output


def test_sbatch_trains_on_a_real_slurm_cluster(slurm, tmp_path):
    job, fields, output = _submit(slurm, str(tmp_path), ["parallel.cp=2"] + FAST)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, output[-3000:])
    assert fields["NumNodes"] == "1" and fields["NodeList"] == "localhost"
    assert "dist_attn: 1 nodes x 2 processes, rendezvous at localhost:" in output
    run_dir = tmp_path / f"slurm-{job}"  # the sbatch script names the run after the job
    assert f"metrics:     {run_dir}/metrics.jsonl" in output
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(3.0 < r["loss"] < 5.0 for r in rows), [r["loss"] for r in rows]
    assert rows[-1]["comm_by_kind"].get("p2p", 0) > 0  # two CP ranks talked: the zigzag ring ran
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000002", "step_00000004"]


def test_sbatch_job_with_a_bad_config_ends_failed(slurm, tmp_path):
    """parallel.cp=4 on 2 processes: every rank refuses before any collective; srun and the job fail."""
    job, fields, output = _submit(slurm, str(tmp_path), ["parallel.cp=4"] + FAST)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", fields
    assert "expected the world size 2" in output, output[-3000:]
