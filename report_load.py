"""Loading a model larger than the device: the load peak of each variant against the baseline's,
from results/load.csv (``python sweep.py load``). Called by report.py; every number is a row's."""
from __future__ import annotations

from pathlib import Path

import bench
from report_study import markdown_table, suite_rows

SUITE = "load"


def _mb(value) -> str:
    return "" if value is None else f"{value / 1e6:.1f}"


def load_section(results: Path) -> str:
    rows = suite_rows(results, SUITE)
    if not rows:
        return f"No rows in results/{SUITE}.csv yet: run `python sweep.py {SUITE}`."
    lines = []
    for row in rows:
        base = next((r for r in rows if r["variant"] == "baseline" and r["model"] == row["model"]
                     and r["quant"] == row["quant"]), None)
        peak, standby = bench.number(row["load_peak_bytes"]), bench.number(row["standby_bytes"])
        base_peak = bench.number(base["load_peak_bytes"]) if base else None
        # the offloaded layers' bytes: what the unpatched model holds beyond the variant's standby
        offloaded = bench.number(row["baseline_standby_bytes"]) - standby if row["variant"] != "baseline" else None
        saved = base_peak - peak if base_peak is not None and row["variant"] != "baseline" else None
        holds = "" if saved is None else ("yes" if saved >= offloaded else "no")
        same_ppl = "" if base is None or row is base else ("= baseline" if row["ppl"] == base["ppl"] else "differs")
        lines.append([row["model"], row["quant"], row["variant"], _mb(peak), _mb(standby), _mb(offloaded),
                      _mb(saved), holds, f"{bench.number(row['ppl']):.4f}" if row["ppl"] else "", same_ppl,
                      f"{bench.number(row['load_s']):.1f}"])
    headers = ["model", "quant", "variant", "load peak MB", "standby MB", "offloaded layers MB",
               "load peak saved MB", "saved >= offloaded", "PPL", "PPL vs baseline", "from_pretrained s"]
    machines = sorted({f"{r['device_name']} ({r['cpu_isa']})" for r in rows})
    return (f"From results/{SUITE}.csv (`python sweep.py {SUITE}`; {', '.join(machines)}; commit "
            f"{', '.join(sorted({r['commit'] for r in rows}))}). CPU rows count the weights on the device "
            "after from_pretrained and after each offloaded layer is made real (CUDA rows: the allocator's "
            "peak).\n\n" + markdown_table(headers, lines))


def sections(results_dir: Path) -> dict[str, str]:
    """README block name -> markdown."""
    return {SUITE: load_section(Path(results_dir))}
