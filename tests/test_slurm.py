"""slurm/submit.py and slurm/array.sbatch: the rendered job script (snapshot), its options
and checks, the task script run by bash without SLURM, and a real job array on a
single-node SLURM cluster started by slurm/local-cluster.sh (skipped, with the reason,
where the Debian packages or root are missing)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmpi import sweep
from fedmpi.config import ConfigError
from fedmpi.metrics import open_run

from .conftest import REPO

SNAPSHOTS = Path(__file__).parent / "snapshots"
CLUSTER = REPO / "slurm" / "local-cluster.sh"
SLURM_DIR = "/tmp/fedmpi-slurm"  # one cluster per machine (fixed ports): a fixed folder


def _load_submit():
    spec = importlib.util.spec_from_file_location("fedmpi_slurm_submit",
                                                  REPO / "slurm" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


submit = _load_submit()


def tiny_doc(out_dir: str, seeds=(0, 1), rounds: int = 3, **sweep_extra) -> dict:
    return {
        "run": {"rounds": rounds, "threads": 1, "out_dir": out_dir},
        "data": {"num_clients": 6},
        "client": {"local_steps": 3},
        "model": {"hidden": 32},
        "sweep": {"seeds": list(seeds),
                  "cases": {"method": {"fedavg": {"compressor.name": "identity"},
                                       "topk": {"compressor.name": "topk",
                                                "compressor.ef": True}}},
                  **sweep_extra},
    }


SNAP_OPTS = submit.Options(partition="gpu", time="2:00:00", nodes=1, ranks_per_node=3,
                           gpus_per_node=2, cpus_per_task=2, max_parallel=2,
                           signal_before=300, python="/opt/venv/bin/python",
                           mpiexec="/opt/venv/bin/mpiexec", workdir="/scratch/fedmpi",
                           fedmpi_root="/scratch/fedmpi", commit="0123456789ab")


def test_rendered_script_matches_snapshot():
    sw = sweep.expand(tiny_doc("runs/snap"), "snap", source="jobs/snap.toml")
    text = submit.render(sw, sw.points, SNAP_OPTS)
    snap = SNAPSHOTS / "sbatch_array.sh"
    if os.environ.get("FEDMPI_UPDATE_SNAPSHOTS") == "1":
        snap.parent.mkdir(exist_ok=True)
        snap.write_text(text)
    assert text == snap.read_text(), ("rendered sbatch script changed; if intended, rerun "
                                      "with FEDMPI_UPDATE_SNAPSHOTS=1 and review the diff")


def sbatch_lines(text: str) -> list[str]:
    return [ln[len("#SBATCH "):] for ln in text.splitlines() if ln.startswith("#SBATCH ")]


def test_render_options_and_requeue_flow():
    sw = sweep.expand(tiny_doc("runs/x"), "x")
    text = submit.render(sw, sw.points, SNAP_OPTS)
    opts = sbatch_lines(text)
    assert "--array=0-3%2" in opts  # one task per run, %max-parallel
    for o in ("--nodes=1", "--ntasks-per-node=3", "--gpus-per-node=2", "--partition=gpu",
              "--time=2:00:00", "--cpus-per-task=2", "--requeue", "--signal=B:USR1@300",
              "--open-mode=append", "--chdir=/scratch/fedmpi",
              "--output=/scratch/fedmpi/runs/x/logs/%x_%A_%a.out"):
        assert o in opts, o
    names = re.search(r"RUNS=\(\n(.*?)\)", text, re.S).group(1).split()
    assert names == [p.name for p in sw.points]
    assert '/opt/venv/bin/mpiexec -n "$SLURM_NTASKS" "$PYTHON" -m mpi4py -m fedmpi.train' \
        ' "$CONFIG" --resume' in text
    assert 'scontrol requeue "$TASK"' in text and "trap 'on_signal USR1' USR1" in text
    assert "{{" not in text
    # no throttle, no GPUs, srun, defaults
    plain = submit.render(sw, sw.points, submit.Options(launcher="srun", workdir="/w",
                                                        python="/p/python"))
    opts = sbatch_lines(plain)
    assert "--array=0-3" in opts and not any(o.startswith(("--gpus", "--time", "--part"))
                                             for o in opts)
    assert 'srun --mpi=pmi2 --kill-on-bad-exit=1 -n "$SLURM_NTASKS" "$PYTHON"' in plain
    for script in (text, plain):
        check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("limit, seconds", [("90", 5400), ("5:30", 330), ("2:00:00", 7200),
                                            ("1-12", 129600), ("1-0:30", 88200),
                                            ("2-01:02:03", 176523)])
def test_time_limits(limit, seconds):
    assert submit.time_seconds(limit) == seconds


@pytest.mark.parametrize("opts, key", [
    (dict(ranks_per_node=8), "method-fedavg_seed-0: data.num_clients"),  # 7 client ranks
    (dict(time="4:00", signal_before=300), "--signal-before"),
    (dict(time="soon"), "--time"),
    (dict(nodes=0), "--nodes"),
    (dict(max_parallel=-1), "--max-parallel"),
    (dict(partition="a b"), "--partition"),
])
def test_render_checks(opts, key):
    sw = sweep.expand(tiny_doc("runs/x"), "x")
    with pytest.raises(ConfigError) as err:
        submit.render(sw, sw.points, submit.Options(workdir="/w", **opts))
    assert err.value.key == key


def test_dry_run_cli_and_complete_runs_left_out(tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text(f"""
[run]
rounds = 3
out_dir = "{tmp_path / 'out'}"
[data]
num_clients = 6
[sweep]
seeds = [0, 1, 2]
ranks = 4
""")
    sw = sweep.load(str(f))
    from .test_sweep import _fake_run

    _fake_run(sw.points[1], complete=True)
    assert submit.main([str(f), "--dry-run", "--max-parallel", "2"]) == 0
    text = capsys.readouterr().out
    assert "--array=0-1%2" in sbatch_lines(text)  # 2 of 3 runs
    assert "--ntasks-per-node=4" in sbatch_lines(text)  # from [sweep] ranks
    assert re.search(r"RUNS=\(\n(.*?)\)", text, re.S).group(1).split() == ["seed-0", "seed-2"]
    assert not (tmp_path / "out" / "configs").exists()
    assert submit.main([str(f), "--dry-run", "--all"]) == 0
    assert "--array=0-2" in sbatch_lines(capsys.readouterr().out)
    assert submit.main([str(f), "--dry-run", "--time", "1", "--signal-before", "90"]) == 2
    assert "--signal-before" in capsys.readouterr().err


def fake_slurm_env(tmp_path: Path, task: int = 0) -> dict[str, str]:
    """Environment of an array task, with an `scontrol` that records its arguments."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_JOB_ID="77", SLURM_NTASKS="1",
               PATH=f"{bindir}{os.pathsep}{env['PATH']}",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def wait_rows(path: str, rows: int, proc=None, timeout: float = 300) -> None:
    """Until the run file at ``path`` has ``rows`` rows (read while it is written)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"task exited early: {proc.communicate()}")
        try:
            if len(open_run(path)) >= rows:
                return
        except (OSError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {rows} rows in {timeout} s")


def check_resumed(point: sweep.Point, log: str) -> None:
    """The run is complete, every round once, and the second start did not begin again at
    round 1 (the per-round lines of both starts are in the appended log)."""
    run = open_run(point.path)
    rounds = point.config.run.rounds
    assert run.complete and list(run.rounds["round"]) == list(range(rounds))
    assert log.count(f"round    1/{rounds}") == 1, log
    assert log.count(f"round {rounds:4d}/{rounds}") == 1, log
    assert "checkpointed before round" in log


@pytest.mark.slow
def test_task_script_checkpoints_requeues_and_resumes(tmp_path):
    sw = sweep.expand(tiny_doc(str(tmp_path / "out"), seeds=[0], rounds=60), "t")
    script = tmp_path / "job.sh"
    script.write_text(submit.render(sw, sw.points, submit.Options(workdir=str(tmp_path))))
    sweep.write_configs(sw)
    (tmp_path / "out" / "logs").mkdir(parents=True)
    point = sw.points[1]  # array task 1 runs point 1
    env = fake_slurm_env(tmp_path, task=1)
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        wait_rows(point.path, 2, proc)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@... does before the limit
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "caught SIGUSR1" in out and "exited with status 75" in out
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "77_1"]
    assert not os.path.exists(sw.points[0].path)
    run = open_run(point.path)
    assert not run.complete and 2 <= len(run) < 100
    assert os.path.exists(os.path.join(point.config.run.out_dir, f"{point.name}.ckpt"))
    # SLURM starts the requeued task again: it resumes and finishes
    env["SLURM_RESTART_COUNT"] = "1"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "start (restart 1)" in done.stdout and "complete:" in done.stdout
    check_resumed(point, (tmp_path / "out" / "logs" / f"{point.name}.log").read_text())
    assert open_run(point.path).config == point.config
    # a third start (e.g. a requeue racing the finish) finds the run complete
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "77_1"]


def copy_checkout(dest: Path) -> str:
    """This checkout's files (tracked and untracked, not ignored) as a new git repository
    at ``dest`` with one commit; returns that commit."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    git = ["git", "-C", str(dest), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow
def test_job_runs_the_checkout_that_submitted_it(tmp_path):
    """submit.py of another checkout, called with this checkout first on PYTHONPATH (and an
    installed fedmpi): the rendered job puts its own checkout first, and run by bash from
    this checkout's folder with the same PYTHONPATH it still runs the submitting
    checkout's code, whose commit the run file records and the task log shows."""
    other = tmp_path / "other"
    commit = copy_checkout(other)
    sw_file = tmp_path / "s.toml"
    sw_file.write_text(f"""
[run]
rounds = 2
threads = 1
out_dir = "{tmp_path / 'out'}"
[data]
num_clients = 6
[client]
local_steps = 3
[model]
hidden = 32
[sweep]
seeds = [0]
""")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get(
        "PYTHONPATH", ""))
    dry = subprocess.run([sys.executable, str(other / "slurm" / "submit.py"), str(sw_file),
                          "--dry-run", "--workdir", str(tmp_path)], capture_output=True,
                         text=True, env=env, cwd=str(REPO))
    assert dry.returncode == 0, dry.stderr
    assert f"\nFEDMPI_ROOT={other}\n" in dry.stdout
    assert f"\nSUBMITTED_COMMIT={commit}\n" in dry.stdout
    assert f"Code: the fedmpi package in {other} (submitted at git {commit})" in dry.stdout
    script = tmp_path / "job.sh"
    script.write_text(dry.stdout)
    sw = sweep.load(str(sw_file))
    sweep.write_configs(sw)
    (tmp_path / "out" / "logs").mkdir(parents=True)
    task = subprocess.run(["bash", str(script)], env=fake_slurm_env(tmp_path, task=0),
                          capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert task.returncode == 0, task.stdout + task.stderr
    assert f"fedmpi from {other} at git {commit} (submitted at {commit})" in task.stdout
    run = open_run(sw.points[0].path)
    assert run.complete and run.attrs["git_commit"] == commit
    # a Python that cannot import fedmpi from the recorded checkout is not started
    moved = tmp_path / "moved"
    script.write_text(dry.stdout.replace(f"\nFEDMPI_ROOT={other}\n",
                                         f"\nFEDMPI_ROOT={moved}\n"))
    moved.mkdir()
    bad = subprocess.run(["bash", str(script)], env=fake_slurm_env(tmp_path, task=0),
                         capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert bad.returncode == 2 and f"not from {moved}; not started" in bad.stdout


def test_local_cluster_status_and_down_when_down(tmp_path):
    """Without a running cluster (and without SLURM installed): `status` says so and
    exits 1; `down` removes the slurm.conf link that `up` made, and only that one."""
    env = dict(os.environ, SLURM_DIR=str(tmp_path / "d"),
               SLURM_ETC_CONF=str(tmp_path / "etc" / "slurm.conf"))
    status = subprocess.run([str(CLUSTER), "status"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 1
    assert status.stdout.startswith(f"local SLURM cluster down ({tmp_path / 'd'}")
    link = tmp_path / "etc" / "slurm.conf"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "d" / "slurm.conf")  # what `up` made; dangling once down
    down = subprocess.run([str(CLUSTER), "down"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert down.returncode == 0 and "down" in down.stdout
    assert not link.is_symlink()
    link.symlink_to(tmp_path / "someone-elses.conf")  # not ours: left alone
    subprocess.run([str(CLUSTER), "down"], env=env, capture_output=True, timeout=60)
    assert link.is_symlink()


# ---------------------------------------------------------------------------- real SLURM

SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def slurm_unavailable() -> str | None:
    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None]
    if missing:
        return (f"SLURM not installed (missing {', '.join(missing)}): apt-get install "
                "--no-install-recommends slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = slurm_unavailable()
    if why:
        pytest.skip(why)
    env = dict(os.environ, SLURM_DIR=SLURM_DIR, SLURM_CONF=f"{SLURM_DIR}/slurm.conf",
               SLURM_AUTH="munge" if shutil.which("munged") else "none")
    was_up = subprocess.run([str(CLUSTER), "status"], env=env, capture_output=True
                            ).returncode == 0
    up = subprocess.run([str(CLUSTER), "up"], env=env, capture_output=True, text=True,
                        timeout=180)
    if up.returncode != 0:
        logs = "".join(p.read_text()[-2000:] for p in Path(SLURM_DIR, "log").glob("*.log"))
        pytest.fail(f"local SLURM did not start:\n{up.stdout}{up.stderr}\n{logs}")
    yield env
    if not was_up:
        subprocess.run([str(CLUSTER), "down"], env=env, capture_output=True, timeout=60)


def wait_gone(job: str, env: dict, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        q = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                           text=True)
        if q.returncode == 0 and not q.stdout.strip():
            return
        time.sleep(0.3)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} still queued after {timeout} s")


def task_states(job: str, env: dict) -> dict[int, str]:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                         text=True).stdout
    states = {}
    for block in out.split("\n\n"):
        task = re.search(r"ArrayTaskId=(\d+)", block)
        state = re.search(r"JobState=(\S+).*?ExitCode=(\S+)", block, re.S)
        if task and state:
            states[int(task.group(1))] = f"{state.group(1)} {state.group(2)}"
    return states


@pytest.mark.slow
def test_job_array_on_local_slurm(cluster, tmp_path):
    sw = sweep.expand(tiny_doc(str(tmp_path / "out"), seeds=[0]), "tiny")
    opts = submit.Options(ranks_per_node=2, max_parallel=2, workdir=str(tmp_path),
                          launcher="srun")  # mpiexec: the requeue test below
    job, script = submit.submit(sw, sw.points, opts, env=cluster)
    wait_gone(job, cluster, timeout=240)
    logs = tmp_path / "out" / "logs"
    outs = {p.name: p.read_text() for p in logs.glob("tiny_*.out")}
    assert sorted(outs) == [f"tiny_{job}_0.out", f"tiny_{job}_1.out"], sorted(outs)
    for i, p in enumerate(sw.points):
        run = open_run(p.path)
        assert run.complete and len(run) == 3, outs
        assert run.attrs["mpi_size"] == 2  # 1 node x 2 ranks per node
        assert run.config == p.config
        assert "done:" in (logs / f"{p.name}.log").read_text()
        assert f"complete: {p.path}" in outs[f"tiny_{job}_{i}.out"]
    assert task_states(job, cluster) == {0: "COMPLETED 0:0", 1: "COMPLETED 0:0"}
    assert submit.select(sw) == []  # submitting again finds nothing to do


@pytest.mark.slow
def test_requeue_on_signal_on_local_slurm(cluster, tmp_path):
    """SIGUSR1 to the batch script (as --signal=B:USR1@... sends it before the time limit):
    the run checkpoints, the task requeues itself, SLURM starts it again and it resumes."""
    sw = sweep.expand(tiny_doc(str(tmp_path / "out"), seeds=[0], rounds=60), "rq")
    point = sw.points[0]
    job, _ = submit.submit(sw, [point], submit.Options(workdir=str(tmp_path)), env=cluster)
    wait_rows(point.path, 2)
    info = subprocess.run(["scontrol", "show", "job", f"{job}_0"], env=cluster,
                          capture_output=True, text=True).stdout
    job_id = re.search(r"JobId=(\d+)", info).group(1)  # this task's own job id
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=cluster, check=True)
    wait_gone(job, cluster, timeout=240)
    logs = tmp_path / "out" / "logs"
    out = (logs / f"rq_{job}_0.out").read_text()
    assert "caught SIGUSR1" in out and "exited with status 75" in out, out
    assert f"requeueing {job}_0" in out and "start (restart 1)" in out, out
    assert f"complete: {point.path}" in out
    check_resumed(point, (logs / f"{point.name}.log").read_text())
    info = subprocess.run(["scontrol", "show", "job", job_id], env=cluster,
                          capture_output=True, text=True).stdout
    assert "Restarts=1" in info and "JobState=COMPLETED" in info, info
