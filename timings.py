"""How long a user waits: run one of the README's jobs as a user would and append its wall time,
with the machine's cores and load, to results/timings.csv (README's "How long" sentence is
generated from it by report.py).

    python timings.py main-job      # python run_kvcache.py (appends its own row to results/kvcache.csv too)
    python timings.py tests         # python -m pytest, the whole suite
    python timings.py tests --out /tmp/timings.csv

The job's own output passes through. Run it on the machine whose figure you want, as it is:
the row records the load average before and after, so a busy machine's figure says so.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import bench

# job -> the command it runs from the repo root (sys.executable stands for `python`)
JOBS = {
    "main-job": ("run_kvcache.py",),
    "tests": ("-m", "pytest"),
}
CSV = bench.RESULTS_DIR / "timings.csv"


@dataclasses.dataclass(frozen=True)
class Timing:
    """One row of results/timings.csv."""
    job: str              # a key of JOBS
    command: str          # what ran, as a user types it
    exit_code: int        # the job's exit status (0: it passed)
    wall_s: float         # wall seconds from start to exit
    cpus: int             # cores this process may use
    cpu_name: str         # /proc/cpuinfo's model name
    cpu_isa: str          # the machine kind for NF4 (bench.cpu_isa(): avx2, avx512_bf16, amx)
    load_avg_start: float  # 1-minute load average just before the job
    load_avg_end: float    # ... and just after it
    commit: str           # the repo's commit (-dirty: tracked code differed)
    timestamp: str        # UTC, ISO 8601, when the job ended


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def record(job: str, out: Path = CSV, run=subprocess.run) -> Timing:
    """Run JOBS[job] from the repo root, time it, append its Timing to `out`; returns the row."""
    argv = [sys.executable, *JOBS[job]]
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    code = run(argv, cwd=bench.REPO_DIR).returncode
    wall = time.perf_counter() - start
    row = Timing(job=job, command=" ".join(["python", *JOBS[job]]), exit_code=code, wall_s=round(wall, 3),
                 cpus=cpus(), cpu_name=bench.cpu_name(), cpu_isa=bench.cpu_isa(), load_avg_start=round(load_start, 2),
                 load_avg_end=round(os.getloadavg()[0], 2), commit=bench.git_commit(),
                 timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    bench.append_row(out, row)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = bench.new_parser(Path(__file__).name, __doc__.split("\n\n")[0])
    parser.add_argument("job", choices=JOBS, help="which job to time: " + "; ".join(
        f"{job}: python {' '.join(cmd)}" for job, cmd in JOBS.items()))
    parser.add_argument("--out", type=Path, default=CSV, help="CSV the row is appended to")
    args = parser.parse_args(argv)
    row = record(args.job, args.out)
    print(f"{row.job}: {row.wall_s:.1f} s on {row.cpu_name}, {row.cpu_isa} ({row.cpus} cores, load average {row.load_avg_start:g} "
          f"before, {row.load_avg_end:g} after), exit {row.exit_code}; row appended to {args.out}")
    return 0 if row.exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
