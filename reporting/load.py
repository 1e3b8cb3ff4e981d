"""Loading a model larger than the device: the load peak of each variant against the baseline's,
from results/load.csv (``python sweep.py load``). Every number is a row's."""
from __future__ import annotations

from pathlib import Path

import bench
from bench import hostmem
from reporting.tables import commits, machines, markdown_table, mb, missing, suite_rows, unpatched_row

SUITE = "load"


def _saved(row: dict, base: dict | None, column: str) -> int | None:
    """How many bytes below the same-model baseline's `column` the row's is (None: no baseline)."""
    if base is None or row is base or not row[column] or not base[column]:
        return None
    return bench.number(base[column]) - bench.number(row[column])


def load_section(results: Path) -> str:
    rows = suite_rows(results, SUITE)
    if not rows:
        return missing(f"{SUITE}.csv", f"python sweep.py {SUITE}")
    lines = []
    for row in rows:
        base = unpatched_row(rows, row)
        # the offloaded layers' bytes as loaded: the baseline row's standby less the variant's (the
        # same-run baseline_standby_bytes also counts the layer files' alignment padding)
        before = base["standby_bytes"] if base is not None else row["baseline_standby_bytes"]
        offloaded = bench.number(before) - bench.number(row["standby_bytes"]) if row["variant"] != "baseline" else None
        saved, host_saved = _saved(row, base, "load_peak_bytes"), _saved(row, base, "load_peak_host_bytes")
        same_ppl = "" if base is None or row is base else ("= baseline" if row["ppl"] == base["ppl"] else "differs")
        lines.append([row["model"], row["quant"], row["variant"], mb(row["load_peak_bytes"]), mb(row["standby_bytes"]),
                      mb(offloaded), mb(saved), "" if saved is None else ("yes" if saved >= offloaded else "no"),
                      mb(row["load_peak_host_bytes"]), mb(host_saved),
                      f"{bench.number(row['ppl']):.4f}" if row["ppl"] else "", same_ppl,
                      f"{bench.number(row['load_s']):.1f}"])
    headers = ["model", "quant", "variant", "load peak MB", "standby MB", "offloaded layers MB",
               "load peak saved MB", "saved >= offloaded", "host load peak MB", "host peak saved MB", "PPL",
               "PPL vs baseline", "load s"]
    return (f"From results/{SUITE}.csv (`python sweep.py {SUITE}`; {machines(rows)}; commit "
            f"{commits(rows)}). *Load peak*: on CPU the weight bytes counted "
            "after from_pretrained and after each offloaded layer was made real (CUDA: the allocator's peak); "
            f"*host load peak*: the process's anonymous resident memory, sampled every "
            f"{hostmem.SAMPLE_INTERVAL_S * 1e3:g} ms while loading: "
            "measured, so it also holds torch, Python and from_pretrained's transient copies (each checkpoint "
            "tensor is read, then cast), which vary with when the allocator hands memory back: compare it over "
            "repeated runs, not one row.\n\n" + markdown_table(headers, lines))


def sections(results_dir: Path) -> dict[str, str]:
    """Block name -> markdown."""
    return {SUITE: load_section(Path(results_dir))}
