"""Loading a model larger than the device: the load peak of each variant against the baseline's,
from results/load.csv (``python sweep.py load``). Called by report.py; every number is a row's."""
from __future__ import annotations

from pathlib import Path

import bench
from report_study import markdown_table, mb, suite_rows

SUITE = "load"


def _saved(row: dict, base: dict | None, column: str) -> int | None:
    """How many bytes below the same-model baseline's `column` the row's is (None: no baseline)."""
    if base is None or row is base or not row[column] or not base[column]:
        return None
    return bench.number(base[column]) - bench.number(row[column])


def load_section(results: Path) -> str:
    rows = suite_rows(results, SUITE)
    if not rows:
        return f"No rows in results/{SUITE}.csv yet: run `python sweep.py {SUITE}`."
    lines = []
    for row in rows:
        base = next((r for r in rows if r["variant"] == "baseline" and r["model"] == row["model"]
                     and r["quant"] == row["quant"]), None)
        # the offloaded layers' bytes: what the unpatched model holds beyond the variant's standby
        offloaded = (bench.number(row["baseline_standby_bytes"]) - bench.number(row["standby_bytes"])
                     if row["variant"] != "baseline" else None)
        cells = [row["model"], row["quant"], row["variant"], mb(row["load_peak_bytes"]),
                 mb(row["load_peak_host_bytes"]), mb(row["standby_bytes"]), mb(offloaded)]
        for column in ("load_peak_bytes", "load_peak_host_bytes"):
            saved = _saved(row, base, column)
            cells += ["", ""] if saved is None else [mb(saved), "yes" if saved >= offloaded else "no"]
        same_ppl = "" if base is None or row is base else ("= baseline" if row["ppl"] == base["ppl"] else "differs")
        cells += [f"{bench.number(row['ppl']):.4f}" if row["ppl"] else "", same_ppl,
                  f"{bench.number(row['load_s']):.1f}"]
        lines.append(cells)
    headers = ["model", "quant", "variant", "load peak MB", "host load peak MB", "standby MB",
               "offloaded layers MB", "load peak saved MB", ">= offloaded", "host peak saved MB",
               ">= offloaded", "PPL", "PPL vs baseline", "load s"]
    machines = sorted({f"{r['device_name']} ({r['cpu_isa']})" for r in rows})
    return (f"From results/{SUITE}.csv (`python sweep.py {SUITE}`; {', '.join(machines)}; commit "
            f"{', '.join(sorted({r['commit'] for r in rows}))}). *Load peak*: on CPU the weight bytes counted "
            "after from_pretrained and after each offloaded layer was made real (CUDA: the allocator's peak); "
            "*host load peak*: the process's anonymous resident memory, sampled every 2 ms while loading "
            "(measured, so it includes torch, Python and transient copies).\n\n" + markdown_table(headers, lines))


def sections(results_dir: Path) -> dict[str, str]:
    """README block name -> markdown."""
    return {SUITE: load_section(Path(results_dir))}
