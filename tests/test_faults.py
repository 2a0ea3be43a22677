"""Surviving faults: a rank killed mid-training, a crash in the middle of a checkpoint save, collectives
that time out instead of hanging, a non-finite loss in a launched job, and bad launcher input.

* Elastic restart: ``torchrun --max_restarts 2`` with ``trainer.resume=auto``. Attempt 0: rank 1 is
  SIGKILLed as step 4 starts. Attempt 1 resumes from step 2; rank 0 is SIGKILLed inside the step-4
  save, after DeepSpeed wrote its files and before the commit. Attempt 2 must resume from step 2
  again (the half-written step-4 checkpoint is never loaded, and is removed) and finish. Every logged
  loss of every attempt equals the uninterrupted run's at that step, and the final checkpoint has
  applied exactly 6 optimizer steps: no step lost, none repeated.
* Deleting a checkpoint (pruning, or replacing one saved again) renames it away first, so a crash
  in the middle never leaves a loadable half-deleted ``step_*``.
* The collective timeout comes from the config and reaches every process group (ours and
  DeepSpeed's); a rank that stops taking part makes the others fail after it, with a message.
* A nan/inf loss in a torchrun job: the job exits non-zero on every rank with the step named, and
  the last good checkpoint is complete.
* Bad launcher input fails fast, with a message: no MASTER_ADDR for two nodes, a MASTER_ADDR that
  does not resolve, a rendezvous host that is not there, a world size the parallel sizes do not
  fit, a missing or unreadable data path, a GLOO_SOCKET_IFNAME this host does not have.

This file is also the torchrun entry point of the elastic test (``-m tests.test_faults``): the faults
are injected from outside the project code, chosen by attempt (TORCHELASTIC_RESTART_COUNT) and rank.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["trainer.warmup_steps=1", "trainer.log_every=1", "trainer.micro_batch=4", "trainer.tensorboard=false",
        "trainer.progress=false", "data.seq_len=32"]
FAULTS_ENV = "DIST_ATTN_TEST_FAULTS"


# ---------------------------------------------------------------------------------- fault injection
def _record(run_dir: str, name: str, row: dict) -> None:
    with open(os.path.join(run_dir, name), "a") as f:
        f.write(json.dumps(row) + "\n")


def _install_faults() -> None:
    """Patch the trainer of this worker process: record every resume (rank 0), and kill this rank where
    ``DIST_ATTN_TEST_FAULTS`` (``{attempt: {"rank", "at": "step"|"save", "step"}}``) says."""
    from dist_attn.train.trainer import Trainer
    from dist_attn.parallel.deepspeed import DeepSpeedEngine
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ["RANK"])
    fault = json.loads(os.environ.get(FAULTS_ENV, "{}")).get(str(attempt))

    real_resume = Trainer.resume

    def resume(self):
        first = not self._resumed  # launchers.train calls it, run() again (a no-op)
        real_resume(self)
        if first and self.rank == 0:
            _record(self.run_dir, "attempts.jsonl", dict(attempt=attempt, step=self.step, ckpt=self.last_ckpt))
    Trainer.resume = resume

    if not fault or fault["rank"] != rank:
        return
    if fault["at"] == "step":  # die as step fault["step"] + 1 starts: the other rank is in its collectives
        real_step = Trainer.train_step

        def train_step(self):
            if self.step == fault["step"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self)
        Trainer.train_step = train_step
    else:  # die inside Checkpointer.save: DeepSpeed's files are written, nothing is committed
        real_save = DeepSpeedEngine.save

        def save(self, path, client_state):
            real_save(self, path, client_state)
            if client_state["step"] == fault["step"]:
                run_dir = os.path.dirname(os.path.dirname(path))
                files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
                _record(run_dir, "killed_in_save.jsonl", dict(attempt=attempt, path=path, files=files))
                os.kill(os.getpid(), signal.SIGKILL)
        DeepSpeedEngine.save = save


def _torchrun(nproc: int, overrides: list[str], *, module: str = "tests.test_faults", env: dict | None = None,
              max_restarts: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--max_restarts", str(max_restarts), "--monitor_interval", "0.1", "-m", module, *overrides]
    # as launchers/torchrun.sh does: restarted workers must not read the dead attempt's store keys
    env = dict(os.environ if env is None else env, PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return _run_killing_tree(cmd, env, timeout)


def _run_killing_tree(cmd, env, timeout, cwd=ROOT) -> subprocess.CompletedProcess:
    """subprocess.run that, on timeout, kills the command *and* its descendants (torchrun's workers
    run in sessions of their own), then fails naming the hang."""
    from tests.netns import kill_tree
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, _ = p.communicate()
        raise AssertionError(f"`{' '.join(cmd[:8])} ...` did not finish within {timeout:.0f} s (hang?):\n{out[-3000:]}")
    finally:
        kill_tree(p.pid)
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------- elastic restart
ELASTIC = ["parallel.cp=2", "backend.zero_stage=1", "trainer.steps=6", "trainer.ckpt_every=2",
           "trainer.keep_ckpts=2", "trainer.resume=auto"] + FAST


def test_killed_rank_and_crash_mid_save_resume_without_lost_or_repeated_steps(tmp_path):
    # out_dir: resume=auto falls back to the newest checkpoint of *any* run under out_dir; keep them apart
    ref = _torchrun(2, ELASTIC + [f"trainer.out_dir={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'straight'}"],
                    env=dict(os.environ, **{FAULTS_ENV: "{}"}))
    assert ref.returncode == 0, ref.stdout[-3000:]
    straight = {r["step"]: r["loss"] for r in _metrics(tmp_path / "straight")}
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]

    run_dir = tmp_path / "faulty"
    faults = {"0": {"rank": 1, "at": "step", "step": 3}, "1": {"rank": 0, "at": "save", "step": 4}}
    res = _torchrun(2, ELASTIC + [f"trainer.out_dir={tmp_path / 'b'}", f"hydra.run.dir={run_dir}"],
                    env=dict(os.environ, **{FAULTS_ENV: json.dumps(faults)}), max_restarts=2)
    assert res.returncode == 0, res.stdout[-4000:]

    # attempt 0 started fresh; attempts 1 and 2 resumed from the last *complete* checkpoint, step 2
    attempts = _jsonl(run_dir / "attempts.jsonl")
    assert [(a["attempt"], a["step"]) for a in attempts] == [(0, 0), (1, 2), (2, 2)], attempts
    assert all(a["ckpt"].endswith("step_00000002") for a in attempts[1:]), attempts
    # attempt 1 really died in the middle of the step-4 save: DeepSpeed's files were on disk, uncommitted
    (killed,) = _jsonl(run_dir / "killed_in_save.jsonl")
    assert killed["attempt"] == 1 and os.path.basename(killed["path"]) == ".tmp-step_00000004"
    assert any(f.endswith("model_states.pt") for f in killed["files"]) and "COMPLETE" not in killed["files"]

    # each resume rewinds metrics.jsonl to its checkpoint: every step once, with the uninterrupted loss
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["loss"] == pytest.approx(straight[r["step"]], rel=1e-6, abs=0), (r["step"], r["loss"])

    # the final state applied exactly 6 optimizer steps (a repeated step would make 7, a lost one 5)
    ckpts = run_dir / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_00000004", "step_00000006"]  # no .tmp-* left, 2 kept
    import torch
    states = [os.path.join(d, f) for d, _, fs in os.walk(ckpts / "step_00000006") for f in fs
              if f.endswith("model_states.pt")]
    assert states, os.listdir(ckpts / "step_00000006")
    assert torch.load(states[0], map_location="cpu", weights_only=False)["global_steps"] == 6
    with open(ckpts / "step_00000006" / "trainer_state.json") as f:
        assert json.load(f)["step"] == 6


# ---------------------------------------------------------------------------------- deletion crash
def test_crash_while_deleting_a_checkpoint_never_leaves_a_loadable_half(tmp_path, monkeypatch):
    """Pruning/replacing removes a checkpoint; a crash half-way (here: every file but the marker gone)
    must not leave a ``step_*`` that still claims to be complete."""
    from dist_attn.train import checkpoint as ck
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        d = root / f"step_0000000{step}"
        d.mkdir(parents=True)
        (d / "model_states.pt").write_bytes(b"x" * 100)
        (d / ck.MARKER).write_text(f"{step}\n")
    real_rmtree = shutil.rmtree

    def crash_after_files(path, *a, **k):  # the worst order: the marker would be deleted last
        if not os.path.exists(path):
            return
        for dirpath, _, files in os.walk(path):
            for f in files:
                if f != ck.MARKER:
                    os.remove(os.path.join(dirpath, f))
        raise KeyboardInterrupt("simulated crash in the middle of a deletion")
    monkeypatch.setattr(shutil, "rmtree", crash_after_files)
    with pytest.raises(KeyboardInterrupt):
        ck._discard(str(root / "step_00000004"))
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert ck.complete_checkpoints(str(root)) == [str(root / "step_00000002")]
    assert ck.find_resume("auto", str(tmp_path), str(tmp_path)) == str(root / "step_00000002")



def test_resume_auto_only_takes_another_runs_checkpoint_of_the_same_experiment(tmp_path):
    """A fresh run directory with trainer.resume=auto may continue an earlier run of the *same*
    experiment, never a different one that happens to share out_dir."""
    import json as _json
    from dist_attn.train import checkpoint as ck
    mine, other = {"data": {"seq_len": 64}, "seed": 0}, {"data": {"seq_len": 64}, "seed": 1}
    for run, exp in (("a", mine), ("b", other)):
        d = tmp_path / run / "checkpoints" / "step_00000003"
        d.mkdir(parents=True)
        (d / ck.STATE).write_text(_json.dumps({"step": 3, "experiment": exp}))
        (d / ck.MARKER).write_text("3\n")
    os.utime(tmp_path / "b" / "checkpoints" / "step_00000003" / ck.MARKER, (2e9, 2e9))  # b is newest
    new_run = str(tmp_path / "c")
    assert ck.find_resume("auto", str(tmp_path), new_run, mine) == str(tmp_path / "a" / "checkpoints" / "step_00000003")
    assert ck.find_resume("auto", str(tmp_path), new_run, {"seed": 7}) is None

# ---------------------------------------------------------------------------------- timeouts
def _cfg(overrides, out_dir):
    from hydra import compose, initialize_config_dir
    from dist_attn.train.config import register_configs, to_train_config
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        return to_train_config(compose("train", overrides=FAST + ["trainer.steps=2", "trainer.ckpt_every=0",
                                                                  f"trainer.out_dir={out_dir}"] + overrides))


def _group_timeouts() -> list[float]:
    import torch
    from torch.distributed import distributed_c10d as c10d
    return [pg._get_backend(torch.device("cpu")).options._timeout.total_seconds() for pg in c10d._world.pg_map]


def _timeouts(rank, world, out_dir, timeout_s):
    import torch
    import torch.distributed as dist
    from dist_attn.train.trainer import Trainer
    cfg = _cfg(["parallel.cp=2", "backend.zero_stage=1"], out_dir)
    Trainer(cfg, os.path.join(out_dir, "default"))
    default = _group_timeouts()
    cfg = _cfg(["parallel.cp=2", "backend.zero_stage=1"], out_dir)
    cfg.trainer.timeout_s = timeout_s  # trainer.timeout_s
    trainer = Trainer(cfg, os.path.join(out_dir, "short"))
    configured = _group_timeouts()
    out = dict(default=default, configured=configured,
               default_s=float(_cfg([], out_dir).trainer.timeout_s))
    dist.barrier(group=trainer.cp.group)
    if rank == 0:  # rank 1 never joins this all-reduce: it must fail after timeout_s, not hang
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(4), group=trainer.cp.group)
            out["error"] = None
        except Exception as e:  # noqa: BLE001 - the error itself is what is checked
            out["error"] = f"{type(e).__name__}: {e}"
        out["waited_s"] = time.monotonic() - t0
    else:
        time.sleep(timeout_s + 4)  # alive but silent (a hung rank), then leave
    return out


def test_collective_timeout_comes_from_the_config_and_covers_every_group(tmp_path):
    from tests.dist import run_distributed
    timeout_s = 4.0
    res = run_distributed(_timeouts, 2, str(tmp_path), timeout_s, timeout=180, raise_errors=False)
    r0 = res[0]
    assert not hasattr(r0, "traceback"), getattr(r0, "traceback", "")
    # the world, DP/CP/replica groups and DeepSpeed's own: several groups, every one set
    assert len(r0["default"]) >= 4 and set(r0["default"]) == {r0["default_s"]}, r0["default"]
    assert len(r0["configured"]) >= len(r0["default"]) and set(r0["configured"]) == {timeout_s}, r0["configured"]
    assert r0["error"] is not None and "timed out" in r0["error"].lower(), r0["error"]
    assert timeout_s - 0.5 <= r0["waited_s"] <= timeout_s + 10, r0["waited_s"]


# ---------------------------------------------------------------------------------- non-finite loss
def test_nan_loss_stops_a_launched_job_naming_the_step_with_the_last_good_checkpoint(tmp_path):
    """An absurd learning rate overflows the weights: both ranks stop, torchrun fails, the message names
    the step and a complete checkpoint of the step before (the trainer-level test is in test_train)."""
    run_dir = tmp_path / "nan"
    res = _torchrun(2, ["parallel.cp=2", "trainer.lr=1e30", "trainer.min_lr=1e29", "trainer.steps=8",
                        "trainer.ckpt_every=1", f"hydra.run.dir={run_dir}"] + FAST, module="launchers.train",
                    timeout=180)
    assert res.returncode != 0, res.stdout[-3000:]
    last_good = _metrics(run_dir)[-1]["step"]
    assert last_good < 8
    msg = f"error: trainer: the loss became nan/inf at step {last_good + 1}"
    assert msg in res.stdout, res.stdout[-3000:]
    from dist_attn.train.checkpoint import is_complete
    ckpt = run_dir / "checkpoints" / f"step_{last_good:08d}"
    assert f"Last good checkpoint: {ckpt}" in res.stdout and is_complete(str(ckpt))


# ---------------------------------------------------------------------------------- launcher input
def _launcher(env_extra: dict, overrides: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                           "DIST_ATTN_RUN_ID", "RANK", "WORLD_SIZE",
                                                           "GLOO_SOCKET_IFNAME")}
    env.update(DIST_ATTN_PYTHON=sys.executable, OMP_NUM_THREADS="1", **env_extra)
    t0 = time.monotonic()
    res = _run_killing_tree(["bash", "launchers/torchrun.sh", *overrides], env, timeout)
    return res, time.monotonic() - t0


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["no_master_addr", "unresolvable_master", "absent_rendezvous_host"])
def test_bad_rendezvous_input_fails_fast(case, tmp_path):
    env = dict(NNODES="2", NODE_RANK="1", DIST_ATTN_RUN_ID="bad", NPROC_PER_NODE="1")
    if case == "unresolvable_master":
        env["MASTER_ADDR"] = "no-such-host.invalid"
    elif case == "absent_rendezvous_host":  # resolves, but nobody hosts the rendezvous there
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RDZV_TIMEOUT="5")
    res, took = _launcher(env, [f"hydra.run.dir={tmp_path}"], timeout=90)
    assert res.returncode != 0, res.stdout[-2000:]
    # seconds: a script check; a DNS answer (slow resolvers included); a 5 s store connect + python start
    want = {"no_master_addr": ("needs MASTER_ADDR", 5), "unresolvable_master": ("does not resolve", 30),
            "absent_rendezvous_host": ("RendezvousConnectionError", 60)}[case]
    assert want[0] in res.stdout, res.stdout[-2000:]
    assert took < want[1], f"took {took:.1f} s"


@pytest.mark.parametrize("case", ["world_size_mismatch", "data_path_missing", "data_path_unreadable",
                                  "wrong_network_interface"])
def test_bad_job_input_fails_fast_with_a_message(case, tmp_path):
    overrides = {"world_size_mismatch": ["parallel.cp=4"],
                 "data_path_missing": ["data=memmap", f"data.path={tmp_path / 'missing.bin'}"],
                 "data_path_unreadable": ["data=memmap", f"data.path={tmp_path}"],  # a directory
                 "wrong_network_interface": ["parallel.cp=2"]}[case]
    want = {"world_size_mismatch": "expected the world size 2",
            "data_path_missing": "error: data.path: expected an existing token file",
            "data_path_unreadable": "error: TokenDataset.path: expected a readable token file",
            "wrong_network_interface": "Unable to find address for: nosuchif0"}[case]
    env = {"NPROC_PER_NODE": "2"}
    if case == "wrong_network_interface":  # gloo told to bind to an interface this host does not have
        env["GLOO_SOCKET_IFNAME"] = "nosuchif0"
    res, took = _launcher(env, overrides + [f"hydra.run.dir={tmp_path / 'run'}"], timeout=90)
    assert res.returncode != 0 and want in res.stdout, res.stdout[-2000:]
    assert took < 60, f"took {took:.1f} s"


if __name__ == "__main__":  # torchrun entry of the elastic test: launchers.train with faults injected
    sys.path.insert(0, ROOT)
    _install_faults()
    import runpy  # as __main__, so that Hydra finds configs/ next to launchers/train.py
    runpy.run_module("launchers.train", run_name="__main__")
