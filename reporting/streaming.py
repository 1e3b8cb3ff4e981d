"""Streaming against its peers, on cold storage and in batches: blocks and plots from
results/peers.csv (run_peers.py), results/cold.csv (run_diskoffload.py --cold),
results/batch.csv (--batch-size) and results/profile.csv (profile_step.py). Every number
comes from a row."""
from __future__ import annotations

from pathlib import Path

import bench
import estimate
from reporting.tables import commits, machine_kind, machines, markdown_table, mb, missing, num, save_figure

FILES = ("peers.csv", "cold.csv", "batch.csv", "profile.csv")
PROFILE_OPS = 6  # per run: the ops whose time differs most between the two modes


def peers_section(results: Path) -> str:
    rows = bench.read_rows(results / "peers.csv")
    if not rows:
        return missing("peers.csv", "python run_peers.py --model smollm2-135m --prefetch 0")
    lines = []
    for row in rows:
        runs = [r for r in rows if r["run_id"] == row["run_id"]]
        peer = next((r for r in runs if r["system"] == "accelerate-disk"), None)
        ours = next((r for r in runs if r["system"] == "stream"), None)
        versus = ""
        if row["system"] == "stream" and peer and bench.number(peer["decode_tok_s"]):
            versus = f"{bench.number(row['decode_tok_s']) / bench.number(peer['decode_tok_s']):.2f}x accelerate-disk"
        elif row["system"] != "stream" and ours and bench.number(row["decode_tok_s"]):
            versus = f"ours {bench.number(ours['decode_tok_s']) / bench.number(row['decode_tok_s']):.2f}x"
        # AirLLM streams every layer by design (rows before that was recorded list the others' layers)
        offloaded = row["n_layers"] if row["system"] == "airllm" else len(row["layers_offloaded"].split())
        lines.append([row["model"], row["quant"], row["system"], f"{offloaded}/{row['n_layers']}",
                      num(row["decode_tok_s"], ".2f"), num(row["ratio_to_resident"], ".2f") + ("x" if row["ratio_to_resident"] else ""),
                      versus, mb(row["idle_bytes"]), mb(row["peak_bytes"]), num(row["rss_delta_bytes"], "+,.0f"),
                      row["note"], row["run_id"][:6]])
    headers = ["model", "quant", "system", "offloaded", "decode tok/s", "vs resident", "stream vs peer",
               "idle MB", "peak MB", "RSS delta bytes", "note", "run"]
    return (f"From results/peers.csv (`python run_peers.py`; {machines(rows)}; commit {commits(rows)}). "
            "Rows of one run share its interleaved rounds.\n\n"
            + markdown_table(headers, lines))


def cold_section(results: Path) -> str:
    if not bench.read_rows(results / "cold.csv"):
        return missing("cold.csv", "python run_diskoffload.py --cold --out results/cold.csv")
    return ("From results/cold.csv (`run_diskoffload.py --cold`: each layer file dropped from the page cache "
            "before it is read; the rows without --cold read from the page cache). Predicted with estimate.py's "
            "model from the row's own same-run compute time and its measured cold read rate:\n\n"
            + estimate.check_table(results, "cold.csv"))


def batch_section(results: Path) -> str:
    rows = [r for r in bench.read_rows(results / "batch.csv") if r["busy"] != "True"]
    if not rows:
        return missing("batch.csv", "python run_diskoffload.py --batch-size 16 --out results/batch.csv")
    lines = []
    for row in rows:
        lines.append([machine_kind(row), row["model"], row["quant"], row["variant"],
                      row["mode"] + (f" p{row['prefetch']}" if row["prefetch"] else ""),
                      row["batch_size"], num(row["decode_tok_s"], ".1f"), num(row["decode_ms_per_tok"], ".1f"),
                      num(row["baseline_decode_tok_s"], ".1f"), num(row["decode_ratio"], ".2f") + "x",
                      num(row["other_cpu_share"], ".2f"), row["repeats"]])
    headers = ["machine", "model", "quant", "variant", "mode", "batch", "tok/s (whole batch)", "ms per step",
               "resident tok/s, same run", "vs resident", "other CPU share", "repeats"]
    return (f"From results/batch.csv (`--batch-size N`, left-padded prompts of unequal length, greedy; "
            f"commit {commits(rows)}).\n\n" + markdown_table(headers, lines))


def profile_section(results: Path) -> str:
    rows = bench.read_rows(results / "profile.csv")
    if not rows:
        return missing("profile.csv", "python profile_step.py --batch-size 16")
    lines = []
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        run = [r for r in rows if r["run_id"] == run_id]
        modes = list(dict.fromkeys(r["mode"] for r in run))
        ms = {(r["mode"], r["op"]): bench.number(r["self_ms_per_step"]) for r in run}
        step = {r["mode"]: bench.number(r["step_ms"]) for r in run}
        ops = sorted({r["op"] for r in run}, key=lambda op: -abs(ms.get((modes[-1], op), 0) - ms.get((modes[0], op), 0)))
        for op in ops[:PROFILE_OPS]:
            a, b = ms.get((modes[0], op)), ms.get((modes[-1], op))
            lines.append([machine_kind(run[0]), run[0]["model"], run[0]["quant"], run[0]["batch_size"], f"{modes[0]} {step[modes[0]]:.1f} / "
                          f"{modes[-1]} {step[modes[-1]]:.1f}", op, num(a, ".2f"), num(b, ".2f"),
                          num((b or 0) - (a or 0), "+.2f")])
    headers = ["machine", "model", "quant", "batch", "self CPU ms per step (all ops)", "op", "resident ms/step", "variant ms/step",
               "difference"]
    return ("From results/profile.csv (`python profile_step.py`: torch.profiler over alternating decodes; an op "
            "missing from a mode's top 25 is blank).\n\n" + markdown_table(headers, lines))


def sections(results: Path) -> dict[str, str]:
    return {"peers": peers_section(results), "cold": cold_section(results), "batch": batch_section(results),
            "profile": profile_section(results)}


def plots(results: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        paths.append(save_figure(fig, results / name))

    peers = [r for r in bench.read_rows(results / "peers.csv") if bench.number(r["decode_tok_s"])]
    if peers:
        latest = {}
        for row in peers:  # the latest run per model and format
            latest[(row["model"], row["quant"])] = row["run_id"]
        shown = [r for r in peers if latest[(r["model"], r["quant"])] == r["run_id"]]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(shown) + 2), 4.5))
        labels = [f"{r['system']}\n{r['model']} {r['quant']}" for r in shown]
        bars = ax.bar(range(len(shown)), [bench.number(r["decode_tok_s"]) for r in shown])
        ax.bar_label(bars, [f"{bench.number(r['decode_tok_s']):.2g}" for r in shown], fontsize=8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shown)), labels, fontsize=7, rotation=20, ha="right")
        ax.set_ylabel("decode tok/s (log)")
        ax.set_title("Ours (stream) against accelerate disk offload and AirLLM, same run")
        save(fig, "peers.png")

    cold = [r for r in bench.read_rows(results / "cold.csv") if bench.number(r["decode_ms_per_tok"]) and r["busy"] != "True"]
    if cold:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, is_cold in (("cold reads", "True"), ("page cache", "False")):
            points = sorted((int(r["prefetch"]), bench.number(r["decode_ms_per_tok"])) for r in cold
                            if r["cold_reads"] == is_cold)
            if points:
                ax.plot([p for p, _ in points], [t for _, t in points], "o-", label=label)
        compute = [1000 / bench.number(r["baseline_decode_tok_s"]) for r in cold if bench.number(r["baseline_decode_tok_s"])]
        if compute:
            ax.axhline(sum(compute) / len(compute), color="gray", ls=":", label="resident, same runs (mean)")
        ax.set_xlabel("prefetch depth (layers read ahead)")
        ax.set_ylabel("ms per token")
        ax.set_title(f"Stream decode time per token: {cold[0]['model']} {cold[0]['quant']}")
        ax.legend(fontsize=8)
        save(fig, "cold.png")

    batch = [r for r in bench.read_rows(results / "batch.csv") if bench.number(r["decode_tok_s"]) and r["busy"] != "True"]
    if batch:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in dict.fromkeys(r["mode"] for r in batch):
            points = sorted((int(r["batch_size"]), bench.number(r["decode_tok_s"])) for r in batch if r["mode"] == mode)
            ax.plot([b for b, _ in points], [t for _, t in points], "o-", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tok/s over the batch")
        ax.set_title(f"Throughput vs batch size: {batch[0]['model']} {batch[0]['quant']}")
        ax.legend(fontsize=8)
        save(fig, "batch.png")
    return paths
