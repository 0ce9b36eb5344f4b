"""Dask workers as SLURM jobs, for :func:`wsi_anomaly.pipeline.run_cohort` (``cluster=``).

:class:`SlurmOptions` says what each job asks the scheduler for; :func:`make_slurm_cluster`
turns it into a dask-jobqueue ``SLURMCluster`` (``pip install 'wsi-anomaly[cluster]'``)::

    cluster = make_slurm_cluster(SlurmOptions(partition="gpu", cores=8, memory="64GB",
                                              gpus=1, minimum_jobs=0, maximum_jobs=16))
    try:
        run_cohort(slides, "results/", "model.pt", settings, cluster=cluster)
    finally:
        cluster.close()

Each job runs ``processes`` dask worker processes, and each worker process takes one slide at a
time (one dask thread; torch uses the job's cores divided among its processes). A job with GPUs
runs one worker process per GPU: each declares ``GPU=1`` (so the cohort asks for a GPU per slide)
and sees only its own GPU. Workers write straight to the results folder, which must be on a
filesystem the compute nodes share with the machine that starts the run.

When a job ends early (killed, pre-empted, out of walltime) dask runs its slide again on another
worker; workers leave a few minutes before their walltime so that this rarely happens mid-slide.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from .errors import InvalidInputError

#: Name of the SLURM jobs (as ``squeue`` shows them).
JOB_NAME = "wsi-anomaly"

_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?$")


@dataclass
class SlurmOptions:
    """What each SLURM job asks for, and how many jobs there are.

    ``jobs`` is a fixed number of jobs; ``minimum_jobs``/``maximum_jobs`` instead let the number
    follow the work (adaptive scaling): jobs are submitted while slides wait and cancelled when
    idle. ``memory`` and ``cores`` are per job; ``processes`` worker processes share them (default
    one, or one per GPU). ``gpus`` adds ``--gres=gpu:N``. ``extra_directives`` are further
    ``#SBATCH`` options (``--account=lab``, ``--constraint=a100``, ``--qos=long``);
    ``prologue`` lines run in the job script before the workers start (``module load cuda``).
    """

    partition: str | None = None
    cores: int = 1
    memory: str = "8GB"
    walltime: str = "01:00:00"
    processes: int | None = None
    gpus: int = 0
    jobs: int | None = None
    minimum_jobs: int | None = None
    maximum_jobs: int | None = None
    extra_directives: list[str] = field(default_factory=list)
    prologue: list[str] = field(default_factory=list)
    local_directory: str | None = None
    log_directory: str | None = None
    python: str | None = None
    interface: str | None = None
    dashboard_address: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def adaptive(self) -> bool:
        return self.minimum_jobs is not None or self.maximum_jobs is not None

    @property
    def worker_processes(self) -> int:
        if self.processes is not None:
            return self.processes
        return self.gpus if self.gpus > 0 else 1

    def validate(self) -> None:
        """Raise :class:`InvalidInputError` (one line) on the first bad value."""
        _positive_int("cores", self.cores)
        _non_negative_int("gpus", self.gpus)
        if self.processes is not None:
            _positive_int("processes", self.processes)
        processes = self.worker_processes
        if processes > self.cores:
            raise InvalidInputError(
                f"SLURM: {processes} worker processes per job need at least "
                f"{processes} cores per job (got {self.cores})"
            )
        if self.gpus and processes != self.gpus:
            raise InvalidInputError(
                f"SLURM: a job with {self.gpus} GPUs runs one worker process "
                f"per GPU; leave processes unset or set it to {self.gpus}"
            )
        if self.partition is not None and (
            not self.partition.strip() or any(c.isspace() for c in self.partition)
        ):
            raise InvalidInputError(
                f"SLURM: partition {self.partition!r} is not a partition name (see `sinfo -s`)"
            )
        _memory_bytes(self.memory)
        walltime_s(self.walltime)
        if self.adaptive:
            if self.jobs is not None:
                raise InvalidInputError(
                    "SLURM: give either a fixed number of jobs or a "
                    "minimum/maximum for adaptive scaling, not both"
                )
            low = 0 if self.minimum_jobs is None else self.minimum_jobs
            _non_negative_int("minimum jobs", low)
            if self.maximum_jobs is None:
                raise InvalidInputError(
                    "SLURM: adaptive scaling needs a maximum number of jobs (MIN:MAX)"
                )
            _positive_int("maximum jobs", self.maximum_jobs)
            if low > self.maximum_jobs:
                raise InvalidInputError(
                    f"SLURM: minimum jobs {low} is more than maximum jobs {self.maximum_jobs}"
                )
        elif self.jobs is not None:
            _positive_int("jobs", self.jobs)
        for directive in self.extra_directives:
            if not isinstance(directive, str) or not directive.strip().startswith("-"):
                raise InvalidInputError(
                    f"SLURM: extra directive {directive!r} is not an sbatch "
                    "option (write it like --account=lab or --qos=long)"
                )
            if "\n" in directive:
                raise InvalidInputError(f"SLURM: extra directive {directive!r} spans lines")
        for line in self.prologue:
            if not isinstance(line, str) or "\n" in line:
                raise InvalidInputError(f"SLURM: prologue line {line!r} must be one line")
        if self.python is not None and shutil.which(self.python) is None:
            raise InvalidInputError(
                f"SLURM: python {self.python!r} is not an executable; the "
                "workers need the Python that has wsi-anomaly installed"
            )
        for label, folder in (
            ("local directory", self.local_directory),
            ("log directory", self.log_directory),
        ):
            if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
                raise InvalidInputError(f"SLURM: {label} {folder} is a file, not a folder")

    @property
    def fixed_jobs(self) -> int:
        """Jobs submitted at start when not adaptive."""
        return 1 if self.jobs is None else self.jobs


class JobCounts(TypedDict):
    """The job-count fields of :class:`SlurmOptions`."""

    jobs: int | None
    minimum_jobs: int | None
    maximum_jobs: int | None


def parse_jobs(text: str) -> JobCounts:
    """``"N"`` → N fixed jobs; ``"MIN:MAX"`` → adaptive between MIN and MAX jobs.

    Returns the :class:`SlurmOptions` fields (``jobs``, ``minimum_jobs``, ``maximum_jobs``).
    """
    parts = str(text).strip().split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(parts) == 1 and numbers:
        return {"jobs": numbers[0], "minimum_jobs": None, "maximum_jobs": None}
    if len(parts) == 2 and len(numbers) == 2:
        return {"jobs": None, "minimum_jobs": numbers[0], "maximum_jobs": numbers[1]}
    raise InvalidInputError(
        f"SLURM jobs {text!r}: write N (a fixed number of jobs) or MIN:MAX (adaptive, e.g. 0:16)"
    )


def walltime_s(walltime: str) -> int:
    """Seconds in a SLURM time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``."""
    match = _WALLTIME.match(str(walltime).strip())
    if not match:
        raise InvalidInputError(f"SLURM walltime {walltime!r}: write HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = match.groups()
    values = [int(a)] + [int(v) for v in (b, c) if v is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (values + [0, 0])[:3]
        total = ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(values) == 1:  # MM
        total = values[0] * 60
    elif len(values) == 2:  # MM:SS
        total = values[0] * 60 + values[1]
    else:  # HH:MM:SS
        total = (values[0] * 60 + values[1]) * 60 + values[2]
    if total <= 0:
        raise InvalidInputError(f"SLURM walltime {walltime!r} is zero")
    return total


def worker_lifetime_s(walltime: str) -> int | None:
    """How long a worker stays before it leaves on its own: a margin before the walltime (so a
    slide is not cut off by SLURM), or None when the walltime is too short to keep a margin."""
    total = walltime_s(walltime)
    margin = max(120, total // 10)
    return total - margin if total >= 2 * margin else None


def slurm_node_ready() -> bool:
    """Whether ``sinfo`` answers and shows a node that can take jobs (idle, mixed or
    allocated)."""
    if shutil.which("sinfo") is None:
        return False
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], check=False, capture_output=True, text=True)
    return state.returncode == 0 and any(
        s.startswith(("idle", "mix", "alloc")) for s in state.stdout.split()
    )


def make_slurm_cluster(options: SlurmOptions) -> Any:
    """A dask-jobqueue ``SLURMCluster`` for ``options``, already scaled (or adapting).

    The cluster runs its scheduler in this process; close it when done (``cluster.close()``
    cancels the jobs).
    """
    options.validate()
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise InvalidInputError(
            "running on SLURM needs dask-jobqueue: pip install 'wsi-anomaly[cluster]'"
        ) from None
    processes = options.worker_processes
    threads_per_process = max(1, options.cores // processes)
    worker_args: list[str] = []
    if options.gpus:
        worker_args += ["--resources", "GPU=1"]
        if options.gpus > 1:
            worker_args += ["--preload", __name__]  # dask_setup below: one GPU per process
    lifetime = worker_lifetime_s(options.walltime)
    if lifetime is not None:
        stagger = min(300, max(30, lifetime // 20))
        worker_args += ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{stagger}s"]
    directives = ([f"--gres=gpu:{options.gpus}"] if options.gpus else []) + [
        d.strip() for d in options.extra_directives
    ]
    # One slide per worker process at a time: dask sees one core per process (one thread), SLURM
    # still reserves every core of the job, and torch's threads use the process's share of them.
    prologue = [
        f"export OMP_NUM_THREADS={threads_per_process}",
        f"export MKL_NUM_THREADS={threads_per_process}",
        *options.prologue,
    ]
    log_directory = options.log_directory
    if log_directory is not None:
        Path(log_directory).mkdir(parents=True, exist_ok=True)
    cluster = SLURMCluster(
        queue=options.partition,
        cores=processes,
        job_cpu=options.cores,
        processes=processes,
        memory=options.memory,
        walltime=options.walltime,
        job_name=JOB_NAME,
        job_extra_directives=directives,
        worker_extra_args=worker_args,
        job_script_prologue=prologue,
        local_directory=options.local_directory,
        log_directory=log_directory,
        python=options.python or sys.executable,
        interface=options.interface,
        scheduler_options={
            "dashboard_address": options.dashboard_address or ":0",
            "dashboard": options.dashboard_address is not None,
        },
    )
    try:
        check_job_script(cluster.job_script())
    except BaseException:
        cluster.close()
        raise
    if options.adaptive and options.maximum_jobs is not None:  # validated: adaptive has a maximum
        cluster.adapt(minimum_jobs=options.minimum_jobs or 0, maximum_jobs=options.maximum_jobs)
    else:
        cluster.scale(jobs=options.fixed_jobs)
    return cluster


def check_job_script(script: str) -> None:
    """Ask SLURM whether it would accept the job (``sbatch --test-only``), so that a wrong
    partition, GPU request or memory fails now in one line instead of leaving the cohort
    waiting for workers that never come. Skipped where there is no ``sbatch``."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="wsi-anomaly-job-") as fh:
        fh.write(script)
        fh.flush()
        try:
            result = subprocess.run(
                [sbatch, "--test-only", fh.name],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InvalidInputError(f"SLURM: sbatch does not answer ({exc})") from None
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")
        raise InvalidInputError(
            f"SLURM refuses the worker job: {reason or 'sbatch failed'} "
            "(check partition, GPUs, memory and walltime against `sinfo`)"
        )


def gpu_for_worker(worker_name: str, visible: str | None) -> str | None:
    """The one device a worker process of a multi-GPU job should see.

    Workers of a job are named ``<job>-0``, ``<job>-1``…; worker i takes the i-th of the job's
    ``CUDA_VISIBLE_DEVICES`` (as SLURM set it for ``--gres=gpu:N``), or device i when SLURM set
    none. None when the name has no index.
    """
    head, _, tail = str(worker_name).rpartition("-")
    if not head or not tail.isdigit():
        return None
    index = int(tail)
    devices = [d.strip() for d in (visible or "").split(",") if d.strip()]
    if not devices:
        return str(index)
    return devices[index % len(devices)]


def dask_setup(worker: Any) -> None:
    """dask ``--preload`` hook: pin this worker process to its GPU before CUDA starts."""
    device = gpu_for_worker(worker.name, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device


def _positive_int(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"SLURM: {label} must be a whole number ≥ 1 (got {value!r})")


def _non_negative_int(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"SLURM: {label} must be a whole number ≥ 0 (got {value!r})")


def _memory_bytes(memory: str) -> int:
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(str(memory))
    except (ValueError, TypeError):
        raise InvalidInputError(f"SLURM memory {memory!r}: write it like 16GB or 500MB") from None
    if value < 1 << 20:
        raise InvalidInputError(
            f"SLURM memory {memory!r} is less than 1 MB per job; write it like 16GB"
        )
    return value


def check_scheduler(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a dask scheduler address nothing listens on, before any slide work starts."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls"):
        return  # inproc://, ucx://…: dask checks these itself
    try:
        host, port = parts.hostname, parts.port or 8786
    except ValueError:
        raise InvalidInputError(
            f"--scheduler {address!r} is not an address like tcp://host:8786"
        ) from None
    if not host:
        raise InvalidInputError(f"--scheduler {address!r} is not an address like tcp://host:8786")
    try:
        import socket

        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = (
            f"no answer within {timeout_s:g} s"
            if isinstance(exc, TimeoutError)
            else exc.strerror or str(exc)
        )
        raise InvalidInputError(
            f"cannot reach dask scheduler at {address} ({reason}); start it or check the address"
        ) from None
