"""`cluster`: SLURM options, the job script, and a cohort run through a real SLURM scheduler.

The cohort tests need a running slurmctld: the fixture starts a single-node one with
``.ci/install_slurm.sh`` (root, Debian) and skips with the script's reason where it cannot.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_anomaly.cluster import (
    JOB_NAME,
    SlurmOptions,
    gpu_for_worker,
    make_slurm_cluster,
    parse_jobs,
    slurm_node_ready,
    walltime_s,
    worker_lifetime_s,
)
from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.pipeline import HeatmapSettings, run_cohort
from wsi_anomaly.slide.synthetic import write_synthetic_slide
from wsi_anomaly.tiles import TileStore

INSTALL = Path(__file__).resolve().parents[1] / ".ci" / "install_slurm.sh"
SLIDES = ("a.tif", "b.tif", "c.tif")

jobqueue = pytest.importorskip(
    "dask_jobqueue", reason="dask-jobqueue not installed (pip install 'wsi-anomaly[cluster]')"
)


# -- options and job script (no scheduler needed) ------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cores": 0}, "cores"),
        ({"cores": 2, "processes": 3}, "at least 3 cores"),
        ({"gpus": 2, "cores": 4, "processes": 1}, "one worker process per GPU"),
        ({"gpus": -1}, "gpus"),
        ({"memory": "lots"}, "memory"),
        ({"memory": "10"}, "less than 1 MB"),
        ({"walltime": "1h"}, "walltime"),
        ({"walltime": "00:00:00"}, "zero"),
        ({"partition": "gpu a100"}, "partition"),
        ({"jobs": 2, "maximum_jobs": 4}, "not both"),
        ({"minimum_jobs": 2}, "maximum"),
        ({"minimum_jobs": 5, "maximum_jobs": 2}, "more than maximum"),
        ({"jobs": 0}, "jobs"),
        ({"extra_directives": ["account=lab"]}, "sbatch option"),
        ({"python": "/no/such/python"}, "Python"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(InvalidInputError, match=message) as info:
        SlurmOptions(**kwargs)
    assert "\n" not in str(info.value)


def test_jobs_walltime_and_gpu_helpers():
    assert parse_jobs("4") == {"jobs": 4, "minimum_jobs": None, "maximum_jobs": None}
    assert parse_jobs("0:16") == {"jobs": None, "minimum_jobs": 0, "maximum_jobs": 16}
    for bad in ("", "a", "1:2:3", "2:"):
        with pytest.raises(InvalidInputError, match="MIN:MAX"):
            parse_jobs(bad)
    assert walltime_s("30") == 1800 and walltime_s("01:30") == 90
    assert walltime_s("04:00:00") == 4 * 3600 and walltime_s("1-12") == 36 * 3600
    assert walltime_s("2-00:30:15") == 2 * 86400 + 30 * 60 + 15
    assert worker_lifetime_s("04:00:00") == 4 * 3600 - 1440
    assert worker_lifetime_s("00:03:00") is None  # too short to keep a margin
    assert SlurmOptions(gpus=4, cores=8).worker_processes == 4
    assert gpu_for_worker("wsi-anomaly-3-1", "4,5") == "5"
    assert gpu_for_worker("wsi-anomaly-3-0", None) == "0"
    assert gpu_for_worker("tcp://10.0.0.1:4000", "0,1") is None


def test_job_script_asks_for_what_the_options_say(monkeypatch, tmp_path):
    import wsi_anomaly.cluster as cluster_module

    checked = []
    monkeypatch.setattr(cluster_module, "check_job_script", checked.append)
    options = SlurmOptions(
        partition="gpu",
        cores=8,
        memory="64GB",
        walltime="04:00:00",
        gpus=2,
        minimum_jobs=0,
        maximum_jobs=3,
        extra_directives=["--account=lab"],
        prologue=["module load cuda"],
        log_directory=str(tmp_path / "logs"),
        python=sys.executable,
    )
    cluster = make_slurm_cluster(options)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert checked == [script]
    for line in (
        "#SBATCH -p gpu",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH -t 04:00:00",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --account=lab",
        f"#SBATCH -J {JOB_NAME}",
        "export OMP_NUM_THREADS=4",
        "module load cuda",
    ):
        assert line in script, line
    command = script.strip().splitlines()[-1]
    assert command.startswith(sys.executable)
    # Two worker processes, one slide (thread) and one GPU each, pinned by the preload hook.
    for arg in (
        "--nworkers 2",
        "--nthreads 1",
        "--resources GPU=1",
        "--preload wsi_anomaly.cluster",
        "--lifetime",
    ):
        assert arg in command, arg
    assert (tmp_path / "logs").is_dir()


def test_cpu_job_script_has_no_gpu_request(monkeypatch):
    import wsi_anomaly.cluster as cluster_module

    monkeypatch.setattr(cluster_module, "check_job_script", lambda script: None)
    cluster = make_slurm_cluster(
        SlurmOptions(cores=4, memory="8GB", minimum_jobs=0, maximum_jobs=1)
    )
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "gres" not in script and "GPU" not in script and "--preload" not in script
    assert "--cpus-per-task=4" in script and "--nthreads 1" in script
    assert "export OMP_NUM_THREADS=4" in script


def test_missing_jobqueue_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(InvalidInputError, match=r"wsi-anomaly\[cluster\]"):
        make_slurm_cluster(SlurmOptions())


# -- a real scheduler ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    """A SLURM controller with an idle node: found running, or started by the install script."""
    if slurm_node_ready():
        return
    try:
        result = subprocess.run(
            ["bash", str(INSTALL)], check=False, capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired:
        pytest.skip("SLURM not available: .ci/install_slurm.sh took longer than 15 minutes")
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no reason given"])[-1]
        pytest.skip(f"SLURM not available: {reason}")
    assert slurm_node_ready(), "install_slurm.sh succeeded but sinfo shows no idle node"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm-cohort")
    for seed, name in enumerate(SLIDES, start=11):
        write_synthetic_slide(folder / name, width=1024, height=1024, mpp=0.5, seed=seed)
    return folder


@pytest.fixture(scope="module")
def in_process(cohort, tiny_model, tmp_path_factory):
    """The cohort run in this process: the results SLURM runs must reproduce, and its time."""
    out = tmp_path_factory.mktemp("in-process")
    t0 = time.perf_counter()
    rows = run_cohort([cohort], out, tiny_model, _settings())
    seconds = time.perf_counter() - t0
    assert [r["status"] for r in rows] == ["ok"] * 3
    return _scores(out), seconds


def _settings() -> HeatmapSettings:
    return HeatmapSettings(device="cpu", batch_size=8, progress=False)


def _options(tmp_path: Path, **kw) -> SlurmOptions:
    return SlurmOptions(
        partition="debug",
        cores=1,
        memory="3GB",
        walltime="00:20:00",
        python=sys.executable,
        log_directory=str(tmp_path / "slurm-logs"),
        local_directory=str(tmp_path / "worker-space"),
        **kw,
    )


def _scores(out: Path) -> dict[str, np.ndarray]:
    return {name: TileStore(out / name / "tiles.zarr").scores for name in SLIDES}


def _our_jobs() -> set[str]:
    result = subprocess.run(
        ["squeue", "-h", "-n", JOB_NAME, "-o", "%i"], check=False, capture_output=True, text=True
    )
    return set(result.stdout.split())


class QueueWatch(threading.Thread):
    """Polls ``squeue`` while the cohort runs: every job id seen, and which were running."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.seen: set[str] = set()
        self.running: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            result = subprocess.run(
                ["squeue", "-h", "-n", JOB_NAME, "-o", "%i %t"],
                check=False,
                capture_output=True,
                text=True,
            )
            for line in result.stdout.splitlines():
                job, state = line.split()
                self.seen.add(job)
                if state == "R":
                    self.running.add(job)
            self.stop.wait(self.interval_s)


class KillOneJob(threading.Thread):
    """Once a worker has taken a slide (its lock file is there), ``scancel`` the job whose
    process holds that lock — a node lost mid-slide."""

    def __init__(self, out: Path) -> None:
        super().__init__(daemon=True)
        self.out = out
        self.killed: tuple[str, str] | None = None  # (job id, slide)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for lock in self.out.glob(".*.lock"):
                slide = lock.name[1 : -len(".lock")]
                job = _job_of_lock(lock)
                if job is not None and not (self.out / slide).exists():
                    subprocess.run(["scancel", job], check=True)
                    self.killed = (job, slide)
                    return
            self.stop.wait(0.2)


def _job_of_lock(lock: Path) -> str | None:
    """The SLURM job of the process holding a lock (same machine: its environment says)."""
    try:
        pid = json.loads(lock.read_text())["pid"]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError):
        return None
    for entry in environ:
        if entry.startswith(b"SLURM_JOB_ID="):
            return entry.split(b"=", 1)[1].decode()
    return None


def _run_on_slurm(cohort, out, model, tmp_path, watch_kill: bool, **jobs):
    cluster = make_slurm_cluster(_options(tmp_path, **jobs))
    watch = QueueWatch()
    killer = KillOneJob(out) if watch_kill else None
    watch.start()
    if killer:
        killer.start()
    t0 = time.perf_counter()
    try:
        rows = run_cohort([cohort], out, model, _settings(), cluster=cluster)
    finally:
        seconds = time.perf_counter() - t0
        watch.stop.set()
        if killer:
            killer.stop.set()
        cluster.close()
    watch.join(5)
    return rows, seconds, watch, killer


def test_cohort_on_slurm_matches_in_process(slurm, cohort, tiny_model, in_process, tmp_path):
    expected, local_s = in_process
    rows, slurm_s, watch, _ = _run_on_slurm(
        cohort, tmp_path / "slurm", tiny_model, tmp_path, watch_kill=False, jobs=2
    )
    print(f"\n3-slide cohort: in-process {local_s:.1f} s, SLURM (2 jobs × 1 core) {slurm_s:.1f} s")
    assert sorted(r["status"] for r in rows) == ["ok"] * 3
    got = _scores(tmp_path / "slurm")
    for name in SLIDES:
        assert len(got[name]) == len(expected[name]) > 0
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
    # The slides ran in SLURM jobs, and those jobs are gone once the cluster is closed.
    assert len(watch.running) >= 1, f"squeue never showed a running worker job ({watch.seen})"
    summaries = [json.loads((tmp_path / "slurm" / n / "summary.json").read_text()) for n in SLIDES]
    assert all(s["status"] == "ok" for s in summaries)
    deadline = time.monotonic() + 30
    while _our_jobs() & watch.seen and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _our_jobs() & watch.seen, "worker jobs still queued after cluster.close()"


def test_killed_worker_job_still_completes_the_cohort(
    slurm, cohort, tiny_model, in_process, tmp_path
):
    expected, _ = in_process
    out = tmp_path / "slurm"
    rows, seconds, watch, killer = _run_on_slurm(
        cohort, out, tiny_model, tmp_path, watch_kill=True, minimum_jobs=2, maximum_jobs=2
    )
    print(
        f"\n3-slide cohort with one job killed mid-slide: {seconds:.1f} s, jobs seen "
        f"{sorted(watch.seen)}, killed {killer.killed}"
    )
    assert killer.killed is not None, "no worker job was killed (no slide was seen starting)"
    killed_job, killed_slide = killer.killed
    assert sorted(r["status"] for r in rows) == ["ok"] * 3
    assert (out / killed_slide / "summary.json").is_file()  # the lost slide was run again
    got = _scores(out)
    for name in SLIDES:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert not list(out.glob(".*.partial")) and not list(out.glob(".*.lock"))
    # Adaptive scaling with a minimum of two jobs replaced the killed one.
    assert len(watch.seen - {killed_job}) >= 2, f"no job replaced {killed_job}: {watch.seen}"


def test_a_job_slurm_refuses_fails_at_once(slurm, tmp_path):
    before = _our_jobs()
    with pytest.raises(InvalidInputError, match="SLURM refuses") as info:
        make_slurm_cluster(_options(tmp_path, jobs=1, gpus=1))  # this node has no GPUs
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidInputError, match="partition"):
        make_slurm_cluster(SlurmOptions(partition="no-such-partition", jobs=1))
    # No job was submitted (jobs of earlier tests may still be leaving the queue meanwhile).
    assert not _our_jobs() - before
