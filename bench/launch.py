"""Running a sweep's cases, each one command line in its own process: serially here, as slices
of the pending cases (--array-index, for an `sbatch --array` script of one's own), over N local
workers (submitit's local executor) or as one SLURM job array (submitit).

Wherever it runs, a case writes its row into a row file of its own (bench.rowfiles), named by
the case's id, a hash of its command: a case that fails or is killed leaves no row, and is
pending again. Only the process that launched the cases merges their rows into the suite CSV.
"""
from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .base import REPO_DIR, UsageError
from .csvio import read_rows
from .rowfiles import merge_row_files, row_dir, row_files

SUBMITIT_INSTALL = "pip install submitit"


@dataclass(frozen=True)
class Case:
    suite: str
    argv: tuple[str, ...]  # script and its arguments, --out among them

    @property
    def command(self) -> str:
        """What the script records in its row's `command` column (--row-file left out)."""
        return shlex.join(["python", *self.argv])

    @property
    def id(self) -> str:
        return hashlib.sha256(self.command.encode("utf-8")).hexdigest()[:16]

    @property
    def out(self) -> Path:
        """The CSV the case's row belongs to (its --out)."""
        if "--out" not in self.argv[:-1]:
            raise UsageError(f"this case names no --out: {self.command}")
        return Path(self.argv[self.argv.index("--out") + 1])

    @property
    def row_file(self) -> Path:
        return row_dir(self.out) / f"{self.id}.csv"

    @property
    def run_argv(self) -> tuple[str, ...]:
        """How the case runs: its command, its row into its own file."""
        return (*self.argv, "--row-file", str(self.row_file))


def _outs(cases: list[Case]) -> list[Path]:
    """The cases' CSVs, as paths from here (a relative --out is relative to the repo, where cases run)."""
    return list(dict.fromkeys(REPO_DIR / case.out for case in cases))


def done_commands(cases: list[Case]) -> set[str]:
    """The commands with a row in the cases' CSVs or in a row file waiting to be merged."""
    done = set()
    for out in _outs(cases):
        for path in [out, *row_files(out)]:
            done.update(row.get("command") for row in read_rows(path))
    return done


def pending(cases: list[Case]) -> list[Case]:
    """The cases without a row yet, in order."""
    done = done_commands(cases)
    return [case for case in cases if case.command not in done]


def array_slice(cases: list[Case], index: int, count: int) -> list[Case]:
    """The index-th of `count` slices (every count-th case from `index`), of all the cases, not
    of the pending ones: a slice does not move when other tasks finish cases meanwhile, and the
    pending cases of a suite finished in order still spread evenly."""
    if not 0 <= index < count:
        raise UsageError(f"--array-index {index} is outside 0..{count - 1} (--array-count {count})")
    return cases[index::count]


def merge(cases: list[Case]) -> int:
    """Fold the row files beside each of the cases' CSVs into it, in case order (files of no
    case, e.g. from a suite since changed, after them by name); the rows added."""
    added = 0
    for out in _outs(cases):
        waiting = row_files(out)
        ordered = [REPO_DIR / case.row_file for case in cases if REPO_DIR / case.out == out]
        ordered = [path for path in ordered if path in waiting]
        added += merge_row_files(out, ordered + [p for p in waiting if p not in ordered])
    return added


def run_case(case: Case) -> int:
    """One case in its own process, from the repo (its relative paths hold); its exit code."""
    return subprocess.run([sys.executable, *case.run_argv], cwd=REPO_DIR).returncode


def run_serially(cases: list[Case], merged: list[Case] | None = None) -> list[Case]:
    """Run the cases one after another; the failed ones. merged: the suite whose waiting rows
    are folded into its CSVs after each case (None in an array task, whose siblings may run on
    other nodes: the rows wait for --merge)."""
    from tqdm import tqdm
    failed = []
    for case in tqdm(cases, desc="cases", unit="case"):
        tqdm.write(f"$ {case.command}")
        code = run_case(case)
        if code != 0:
            tqdm.write(f"  failed with exit code {code}")
            failed.append(case)
        if merged is not None:
            merge(merged)
    return failed


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UsageError(f"--launcher needs submitit, an optional dependency: {SUBMITIT_INSTALL}") from None
    return submitit


@dataclass(frozen=True)
class Failure:
    case: Case
    log: Path  # the output of the process that ran it


def launch_local(cases: list[Case], todo: list[Case], worker_argv, workers: int, log_folder: Path,
                 timeout_min: int | None = None) -> list[Failure]:
    """Run `todo` (the pending ones of `cases`) over `workers` processes through submitit's local
    executor, wait for them, and merge. worker_argv(index, count): the sweep.py arguments that
    run slice `index` of `count` (array_slice of `cases`, less the finished ones). timeout_min:
    per worker (default none: submitit's local default, 2 minutes, would end a worker mid-slice).
    The cases left without a row, each with the log of the worker that had it."""
    submitit = _submitit()
    workers = max(1, min(workers, len(todo)))
    executor = submitit.LocalExecutor(folder=str(log_folder))
    executor.update_parameters(timeout_min=timeout_min or 60 * 24 * 365)
    with executor.batch():
        jobs = [executor.submit(submitit.helpers.CommandFunction(
            [sys.executable, "sweep.py", *worker_argv(index, workers)], cwd=str(REPO_DIR), verbose=True))
            for index in range(workers)]
    from tqdm import tqdm
    print(f"{workers} local workers, logs in {', '.join(str(Path(job.paths.stdout).parent) for job in jobs)}")
    with tqdm(total=len(todo), desc="cases", unit="case") as bar:
        while not all(job.done() for job in jobs):
            time.sleep(1)
            bar.update(len(todo) - len(pending(todo)) - bar.n)
    logs = {}
    for index, job in enumerate(jobs):
        try:
            job.result()
        except Exception:  # its failed cases stay pending; its log says why
            pass
        logs.update((case.command, Path(job.paths.stdout)) for case in array_slice(cases, index, workers))
    merge(todo)
    return [Failure(case, logs[case.command]) for case in pending(todo)]


def launch_slurm(cases: list[Case], log_folder: Path, name: str, partition: str | None = None,
                 timeout_min: int | None = None, gpus_per_task: int | None = None,
                 array_parallelism: int | None = None) -> list:
    """Submit `cases` as one SLURM job array, a task per case, and return its jobs without
    waiting. Parameters left None take submitit's defaults. submitit passes each task to its
    node as a pickle in `log_folder` (the command line, nothing else): keep the folder yours."""
    submitit = _submitit()
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise UsageError(f"{' and '.join(missing)} not on the PATH: --launcher submitit submits to SLURM; run it "
                         "where SLURM's commands work, or use --launcher local")
    executor = submitit.AutoExecutor(folder=str(log_folder), cluster="slurm")
    chosen = dict(slurm_partition=partition, timeout_min=timeout_min, gpus_per_node=gpus_per_task,
                  slurm_array_parallelism=array_parallelism)
    executor.update_parameters(name=name, tasks_per_node=1, **{k: v for k, v in chosen.items() if v is not None})
    with executor.batch():
        jobs = [executor.submit(submitit.helpers.CommandFunction([sys.executable, *case.run_argv],
                                                                 cwd=str(REPO_DIR), verbose=True))
                for case in cases]
    return jobs
