"""Fit to a device (--device-budget): offload_skip.plan's configuration against its grid, from
results/fit.csv (sweep.py fit, run_fit.py). Every number comes from a row."""
from __future__ import annotations

import statistics
from pathlib import Path

import bench
from reporting.tables import commits, machine_kind, machines, markdown_table, missing, num

FILE = "fit.csv"
COMMAND = "python sweep.py fit"


def cases(results: Path) -> dict[str, list[dict]]:
    """case_id -> its rows (the plan's first): of the cases not marked busy, the newest of each
    machine kind, model, format, budget and read source (a rerun after the planner changed
    replaces its older rows here; results/fit.csv keeps both)."""
    found: dict[str, list[dict]] = {}
    for row in bench.read_rows(results / FILE):
        found.setdefault(row["case_id"], []).append(row)
    newest: dict[tuple, tuple[str, list[dict]]] = {}
    for case_id, rows in found.items():
        if not any(r["config"] == "plan" for r in rows) or any(r["busy"] == "True" for r in rows):
            continue
        first = rows[0]
        key = (machine_kind(first), first["model"], first["quant"], first["device_budget_bytes"], first["cold_reads"],
               _draft_weighed(rows))
        if key not in newest or first["timestamp"] > newest[key][1][0]["timestamp"]:
            newest[key] = (case_id, rows)
    return {case_id: sorted(rows, key=lambda r: r["config"] != "plan") for case_id, rows in newest.values()}


def _draft_weighed(rows: list[dict]) -> str:
    """The draft a case weighed (run_fit.py --draft), "" for none."""
    return next((r["draft"] for r in rows if r.get("draft")), "")


def _model(rows: list[dict]) -> str:
    draft = _draft_weighed(rows)
    return f"{rows[0]['model']} {rows[0]['quant']}" + (f", --draft {draft}" if draft else "")


def _budget(row: dict) -> str:
    share = f" ({float(row['budget_share']):.0%})" if row["budget_share"] else ""
    return f"{int(row['device_budget_bytes']) / 2**20:,.0f} MiB{share}"


def _reads(row: dict) -> str:
    return "cold" if row["cold_reads"] == "True" else "page cache"


def _config(row: dict) -> str:
    if row["placement"] == "none":
        return "nothing streamed" + (f", draft {row['draft']}" if row.get("draft") else "")
    streamed = len(row["streamed_layers"].split())
    read = f", {row['cpu_read']}" if row["cpu_read"] else ""
    draft = f", draft {row['draft']}" if row.get("draft") else ""
    return f"{streamed} streamed, {row['placement']}, prefetch {row['prefetch']}{read}{draft}"


def case_lines(results: Path) -> list[list[str]]:
    lines = []
    for rows in cases(results).values():
        plan = rows[0]
        fastest = next((r for r in rows if r["fastest_fitting"] == "True"), None)
        default = next((r for r in rows if r["config"] == "default-copy"), None)
        lines.append([
            machine_kind(plan), _model(rows), _reads(plan), _budget(plan), _config(plan),
            num(plan["decode_tok_s"], ".2f"), num(plan["predicted_decode_tok_s"], ".2f"),
            num(plan["predicted_over_measured"], ".2f"),
            f"{fastest['config']} {float(fastest['decode_tok_s']):.2f}" if fastest else "none fits",
            num(plan["plan_over_fastest"], ".2f") + ("x" if plan["plan_over_fastest"] else ""),
            (f"{float(default['decode_tok_s']):.2f}" + ("" if default["fits"] == "True" else " (over)"))
            if default else "",
            f"{_device_bytes(plan) / 2**20:,.1f} MiB"
            + (" fits" if plan["fits"] == "True" else " OVER"),
        ])
    return lines


def _device_bytes(row: dict) -> int:
    """Peak weights, the KV reserve and a draft's bytes: what the row's fits compares with the budget."""
    return int(row["peak_bytes"]) + int(row["kv_reserve_bytes"]) + int(bench.number(row.get("draft_bytes")) or 0)


HEADERS = ["machine", "model", "reads", "device budget", "plan", "plan tok/s", "predicted", "predicted / measured",
           "fastest that fits (tok/s)", "plan / fastest", "today's defaults, copy (tok/s)",
           "plan's peak + KV (+ draft)"]


def section(results: Path) -> str:
    found = cases(results)
    if not found:
        return missing(FILE, COMMAND)
    rows = [r for rs in found.values() for r in rs]
    fitting = [r for r in rows if r["fits"] == "True"]
    errors = [abs(float(r["predicted_over_measured"]) - 1) for r in fitting]
    return (f"From results/fit.csv (`{COMMAND}`; {machines(rows)}; commit {commits(rows)}). Each case's "
            "configurations were timed in one process, round by round in a rotating order "
            f"({next(iter(found.values()))[0]['rounds']} timed rounds of "
            f"{next(iter(found.values()))[0]['max_new_tokens']} tokens); a configuration fits when its peak weights "
            "(controller accounting) plus the KV cache reserved for the run's context are within the budget. "
            f"Predicted against measured over the {len(fitting)} configurations that fit: median error "
            f"{statistics.median(errors):.0%}, largest {max(errors):.0%}.\n\n"
            + markdown_table(HEADERS, case_lines(results)) + "\n\n" + every_row(rows))


def every_row(rows: list[dict]) -> str:
    lines = [[_model([r]), _reads(r), _budget(r), r["config"], _config(r),
              num(r["decode_tok_s"], ".2f"), num(r["predicted_decode_tok_s"], ".2f"),
              f"{int(r['peak_bytes']) / 2**20:,.1f}", r["fits"], r["rates"]] for r in rows]
    return ("Every configuration:\n\n"
            + markdown_table(["model", "reads", "budget", "config", "what", "tok/s", "predicted", "peak MiB", "fits",
                              "probed rates"], lines))


def summary(results: Path) -> str | None:
    """One sentence over every case: the plan against the fastest that fits, the prediction, the budget."""
    found = cases(results)
    if not found:
        return None
    plans = [rows[0] for rows in found.values()]
    near = sum(bench.number(p["plan_over_fastest"]) is not None and float(p["plan_over_fastest"]) >= 0.95
               for p in plans)
    within = sum(abs(float(p["predicted_over_measured"]) - 1) <= 0.2 for p in plans)
    held = sum(p["fits"] == "True" for p in plans)
    beat_default = sum(_at_least_default(rows) for rows in found.values())
    return (f"In {len(plans)} cases ({machines(plans)}) the plan ran at >= 0.95x the fastest configuration that "
            f"fits in {near}, was predicted within 20% in {within}, kept its peak and KV reserve within the budget "
            f"in {held}, and matched today's defaults (where they fit) in {beat_default}.")


def _at_least_default(rows: list[dict]) -> bool:
    plan = rows[0]
    defaults = [r for r in rows if r["config"] in ("default", "default-copy") and r["fits"] == "True"]
    return all(float(plan["decode_tok_s"]) >= float(d["decode_tok_s"]) for d in defaults)


def headline(results: Path) -> str | None:
    """README's line: the summary (the cases' table: results/README.md)."""
    return summary(results)
