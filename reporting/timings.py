"""How long a user waits, for README.md's quick start: the main job's captured output
(results/quickstart.txt, written by reproduce.sh's first line) and its `runtime:` line, and the
wall times `python timings.py JOB` appended to results/timings.csv on whatever machine ran it.
Every number comes from one of those two files."""
from __future__ import annotations

import re
from pathlib import Path

import bench

QUICKSTART = "quickstart.txt"  # in the results folder
DEVICE_BUDGET = "device_budget.txt"  # the quick start's --device-budget run, captured beside it
TIMINGS = "timings.csv"
CAPTURE_COMMAND = "bash reproduce.sh --quickstart"
JOB_LABELS = {"main-job": "the main job (`python run_kvcache.py`)", "tests": "the tests (`python -m pytest`)"}

IDLE = ("The main job took {runtime} on {machine}, alone on the machine with the model already converted "
        "(`results/quickstart.txt`, from `{capture}`).")
LOADED = "With `python timings.py` (`results/{csv}`): {clauses}."
CLAUSE = "{label} took {wall} on {cpu_name} ({cpu_isa}), {cpus} cores, load average {load_start} before and {load_end} after"
# the fastest and the slowest passing run of a job on one machine: an idle and a busy figure
SPAN = ("{label} took {fast} with load average {fast_start} before and {fast_end} after, and {slow} with "
        "{slow_start} and {slow_end}, on {cpu_name} ({cpu_isa}), {cpus} cores")
UNTIMED = ("No other machine timed yet: `python timings.py main-job` and `python timings.py tests` append the wall "
           "times, cores and load to `results/{csv}`.")


def capture(results: Path) -> str | None:
    """The main job's captured stdout, or None when nobody has captured it."""
    path = Path(results) / QUICKSTART
    return path.read_text(encoding="utf-8") if path.is_file() else None


def quickstart_block(results: Path) -> str | None:
    """The capture as a fenced block (README's quickstart markers); None without one."""
    text = capture(results)
    return None if text is None else "```\n" + text.rstrip("\n") + "\n```"


def device_budget_block(results: Path) -> str | None:
    """The --device-budget run's capture as a fenced block (README's device-budget markers)."""
    path = Path(results) / DEVICE_BUDGET
    if not path.is_file():
        return None
    # the plan, and the summary's peak and speed lines (the whole run's output stays in the file)
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith(("plan for", "  ")) and not line.startswith(DROPPED_LINES)
            and "since this process started" not in line]
    return "```\n" + "\n".join(kept) + "\n```"


# the summary lines README's device-budget block leaves out (results/device_budget.txt has them)
DROPPED_LINES = ("  standby weights", "  peak weights", "  load peak", "  idle RSS", "  standby parts", "  paired",
                 "  per run", "  row appended", "  perplexity", "  decode")


def runtime_s(text: str) -> float | None:
    """The seconds of the capture's `runtime: X s` line (bash's `time`, reproduce.sh)."""
    found = re.search(r"^runtime: ([0-9.]+) s$", text, re.M)
    return float(found.group(1)) if found else None


def captured_machine(text: str) -> str | None:
    """What the capture's first line says it ran on: `... on cpu (AMD EPYC, avx512_bf16), ...`."""
    found = re.search(r" on (\w+)(?: \(([^)]*)\))?", text.splitlines()[0] if text else "")
    if not found:
        return None
    device, detail = found.group(1).upper(), found.group(2)
    if not detail:
        return device
    name, _, isa = detail.rpartition(", ")
    return f"{device}: {name} ({isa})" if name else f"{device}: {detail}"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min ({seconds:.0f} s)"


def latest_timings(results: Path) -> dict[str, list[dict]]:
    """job -> its passing rows (exit code 0) on the machine of its newest one (same cpu_name,
    cpu_isa and cores), fastest first, in JOB_LABELS order."""
    rows = [r for r in bench.read_rows(Path(results) / TIMINGS) if r.get("exit_code") == "0"]
    timed = {}
    for job in JOB_LABELS:
        mine = [r for r in rows if r["job"] == job]
        if mine:
            newest = max(mine, key=lambda r: r["timestamp"])
            machine = lambda r: (r["cpu_name"], r["cpu_isa"], r["cpus"])  # noqa: E731
            same = [r for r in mine if machine(r) == machine(newest)]
            timed[job] = sorted(same, key=lambda r: bench.number(r["wall_s"]))
    return timed


def timing_clause(job: str, rows: list[dict]) -> str:
    """One job's figure (CLAUSE), or its fastest and slowest (SPAN) when it ran more than once."""
    fast, slow = rows[0], rows[-1]
    if len(rows) == 1:
        return CLAUSE.format(label=JOB_LABELS[job], wall=duration(bench.number(fast["wall_s"])),
                             cpu_name=fast["cpu_name"], cpu_isa=fast["cpu_isa"], cpus=fast["cpus"],
                             load_start=fast["load_avg_start"],
                             load_end=fast["load_avg_end"])
    return SPAN.format(label=JOB_LABELS[job], fast=duration(bench.number(fast["wall_s"])),
                       fast_start=fast["load_avg_start"], fast_end=fast["load_avg_end"],
                       slow=duration(bench.number(slow["wall_s"])), slow_start=slow["load_avg_start"],
                       slow_end=slow["load_avg_end"], cpu_name=fast["cpu_name"], cpu_isa=fast["cpu_isa"],
                       cpus=fast["cpus"])


def how_long(results: Path) -> str:
    """README's "how long" sentences: IDLE from the capture, LOADED (or UNTIMED) from timings.csv."""
    out = []
    text = capture(results)
    seconds = runtime_s(text) if text else None
    if seconds is not None:
        out.append(IDLE.format(runtime=duration(seconds), machine=captured_machine(text) or "its machine",
                               capture=CAPTURE_COMMAND))
    timed = latest_timings(results)
    if timed:
        out.append(LOADED.format(csv=TIMINGS, clauses="; ".join(
            timing_clause(job, rows) for job, rows in timed.items())))
    else:
        out.append(UNTIMED.format(csv=TIMINGS))
    return " ".join(out)
