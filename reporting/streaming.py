"""Streaming against its peers, on cold storage, in batches, mapped or copied: blocks and plots
from results/peers.csv (run_peers.py), results/cold.csv (run_diskoffload.py --cold),
results/batch.csv (--batch-size), results/profile.csv (profile_step.py) and
results/cpu_read.csv (sweep.py cpu_read). Every number comes from a row."""
from __future__ import annotations

from pathlib import Path

import bench
import estimate
from reporting.tables import commits, machine_kind, machines, markdown_table, mb, missing, num, save_figure

FILES = ("peers.csv", "cold.csv", "batch.csv", "profile.csv", "cpu_read.csv")
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
                      row["mode"] + (f" p{row['prefetch']}" if row["prefetch"] else "")
                      + (f", {read_way(row)}" if row["mode"] == "stream" else ""),
                      row["batch_size"], num(row["decode_tok_s"], ".1f"), num(row["decode_ms_per_tok"], ".1f"),
                      num(row["baseline_decode_tok_s"], ".1f"), num(row["decode_ratio"], ".2f") + "x",
                      num(row["other_cpu_share"], ".2f"), row["repeats"]])
    headers = ["machine", "model", "quant", "variant", "mode", "batch", "tok/s (whole batch)", "ms per step",
               "resident tok/s, same run", "vs resident", "other CPU share", "repeats"]
    return (f"From results/batch.csv (`--batch-size N`, left-padded prompts of unequal length, greedy; "
            f"commit {commits(rows)}).\n\n" + markdown_table(headers, lines))


read_way = estimate.read_path  # how a streamed layer got its bytes: 'map' or 'copy'


def _cpu_read_rows(results: Path) -> list[dict]:
    return [r for r in bench.read_rows(results / "cpu_read.csv") if r["busy"] != "True"]


def _cpu_read_key(row: dict) -> tuple:
    return machine_kind(row), row["model"], row["quant"], row["batch_size"], row["prefetch"]


def cpu_read_section(results: Path) -> str:
    rows = _cpu_read_rows(results)
    if not rows:
        return missing("cpu_read.csv", "python sweep.py cpu_read")
    lines = [[machine_kind(r), r["model"], r["quant"], r["batch_size"], r["prefetch"], read_way(r),
              num(r["decode_tok_s"], ".1f"), num(r["baseline_decode_tok_s"], ".1f"),
              num(r["decode_ratio"], ".3f", "x"), _paired(r), mb(r.get("rss_anon_bytes")), mb(r.get("peak_rss_anon_bytes")),
              mb(r.get("rss_file_bytes")), mb(r["standby_bytes"]), mb(r["peak_bytes"]), r["repeats"]] for r in rows]
    headers = ["machine", "model", "quant", "batch", "prefetch", "CPU read", "stream tok/s", "resident tok/s, same run",
               "vs resident", "paired: median (quartiles)", "idle anon RSS MB", "decoding anon RSS MB, peak", "idle file RSS MB", "standby MB",
               "peak MB", "repeats"]
    return (f"From results/cpu_read.csv (`python sweep.py cpu_read`; commit {commits(rows)}). Each row times "
            "stream residency and the resident model interleaved in one process; `map` binds a streamed layer's "
            "tensors to a private mapping of its file, `copy` reads the file into a slot. Idle RSS is split into "
            "anonymous memory (the process's own) and file-backed pages (the mapped files and libraries, which "
            "the kernel may drop and read again). Paired: each repeat's resident decode seconds over the stream's, "
            "the two timed back to back; their median and quartiles (rows before this column: blank).\n\n"
            + markdown_table(headers, lines))


def _paired(row: dict) -> str:
    median, q1, q3 = (bench.number(row.get(f"paired_ratio_{k}")) for k in ("median", "q1", "q3"))
    return "" if median is None else f"{median:.3f}x ({q1:.3f}-{q3:.3f})"


def cpu_read_pairs(results: Path) -> list[tuple[tuple, dict, dict]]:
    """(key, copy row, map row) per configuration measured both ways, the newest row of each way;
    key: (machine, model, quant, batch, prefetch)."""
    rows = [r for r in _cpu_read_rows(results) if bench.number(r["decode_ratio"])]
    out = []
    for key in dict.fromkeys(_cpu_read_key(r) for r in rows):
        ways = {read_way(r): r for r in rows if _cpu_read_key(r) == key}
        if {"copy", "map"} <= set(ways):
            out.append((key, ways["copy"], ways["map"]))
    return out


def cpu_read_answers(results: Path) -> list[str]:
    """Per configuration with both ways measured: the copy path's ratio beside the map path's."""
    out = []
    for key, copy, mapped in cpu_read_pairs(results):
        machine, model, quant, batch, prefetch = key
        text = (f"{model} {quant}, batch {batch}, prefetch {prefetch} ({machine}): stream decodes at "
                f"{bench.number(copy['decode_ratio']):.2f}x the resident model when it copies, "
                f"{bench.number(mapped['decode_ratio']):.2f}x when it maps")
        if _paired(mapped):
            text += f" (per pair, mapping: median {_paired(mapped)})"
        anon = [bench.number(w.get("rss_anon_bytes")) for w in (copy, mapped)]
        if None not in anon:
            text += f"; idle anonymous RSS {anon[0] / 1e6:.1f} MB copying, {anon[1] / 1e6:.1f} MB mapping"
        peaks = [bench.number(w.get("peak_rss_anon_bytes")) for w in (copy, mapped)]
        if None not in peaks:
            text += f", while decoding at most {peaks[0] / 1e6:.1f} and {peaks[1] / 1e6:.1f} MB"
        out.append(text + ".")
    return out


CPU_READ_LINE = ("{pairs} configurations measured both ways ({machines}): stream decodes at {map_ratios} the resident "
                 "model's speed when it maps each layer file, {copy_ratios} when it copies it{growth}.")
CPU_READ_GROWTH = "; while decoding, anonymous memory grows by at most {map_mb} MB mapping, {copy_mb} MB copying"


def _ratio_range(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}x" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}x to {high:.2f}x"


def cpu_read_line(results: Path) -> str | None:
    """CPU_READ_LINE over every pair of cpu_read_pairs; None without a pair."""
    pairs = cpu_read_pairs(results)
    if not pairs:
        return None

    def growth(row: dict) -> float | None:
        peak, idle = bench.number(row.get("peak_rss_anon_bytes")), bench.number(row.get("rss_anon_bytes"))
        return None if peak is None or idle is None else peak - idle
    grown = {way: [growth(p[k]) for p in pairs] for way, k in (("copy", 1), ("map", 2))}
    complete = all(None not in values for values in grown.values())
    return CPU_READ_LINE.format(
        pairs=len(pairs), machines=", ".join(dict.fromkeys(key[0] for key, _, _ in pairs)),
        map_ratios=_ratio_range([bench.number(m["decode_ratio"]) for _, _, m in pairs]),
        copy_ratios=_ratio_range([bench.number(c["decode_ratio"]) for _, c, _ in pairs]),
        growth=CPU_READ_GROWTH.format(map_mb=f"{max(grown['map']) / 1e6:.1f}", copy_mb=f"{max(grown['copy']) / 1e6:.1f}")
        if complete else "")


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
            "profile": profile_section(results), "cpu-read": cpu_read_section(results)}


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


# --------------------------------------------------------------------------- answers
# Sentences whose every number is computed here from the rows; a claim is stated only when
# the rows bear it out.

def peer_read_way(run: list[dict]) -> str:
    """How the run's stream row got its layers on a CPU: its note says 'layers mapped' (--cpu-read
    map) or 'layers read'; runs from before --cpu-read existed copied."""
    notes = [r["note"] for r in run if r["system"] == "stream"]
    return "map" if notes and "layers mapped" in notes[0] else "copy"


def latest_peer_runs(rows: list[dict]) -> list[list[dict]]:
    """The newest run (run_id) of each machine kind, model, weight format and CPU read way, in file order."""
    runs = {run_id: [r for r in rows if r["run_id"] == run_id] for run_id in dict.fromkeys(r["run_id"] for r in rows)}
    latest = {}
    for run_id, run in runs.items():
        latest[(machine_kind(run[0]), run[0]["model"], run[0]["quant"], peer_read_way(run))] = run_id
    return [runs[run_id] for run_id in dict.fromkeys(latest.values())]


def peers_answers(results: Path) -> list[str]:
    out = []
    for run in latest_peer_runs(bench.read_rows(results / "peers.csv")):
        by = {r["system"]: r for r in run}
        ours, peer, resident = by.get("stream"), by.get("accelerate-disk"), by.get("resident")
        if not ours or not bench.number(ours["decode_tok_s"]):
            continue
        setup = (f"{ours['model']} {ours['quant']}, layers {'mapped' if peer_read_way(run) == 'map' else 'copied'} "
                 f"({machine_kind(ours)})")
        tok_s = bench.number(ours["decode_tok_s"])
        if peer and bench.number(peer["decode_tok_s"]):
            peer_tok_s = bench.number(peer["decode_tok_s"])
            text = (f"**{setup}: ours is {tok_s / peer_tok_s:.2f}x accelerate's disk offload** ({tok_s:.2f} against "
                    f"{peer_tok_s:.2f} tok/s, same rounds)")
            ours_peak, peer_peak = bench.number(ours["peak_bytes"]), bench.number(peer["peak_bytes"])
            if ours_peak and peer_peak and ours["idle_bytes"] == peer["idle_bytes"]:
                text += (f"; both hold {mb(ours['idle_bytes'])} MB idle, and ours peaks "
                         + ("lower" if ours_peak < peer_peak else "higher") + f" ({mb(ours_peak)} against {mb(peer_peak)} MB)")
        else:
            text = f"**{setup}: ours decodes {tok_s:.2f} tok/s**"
        if resident and bench.number(ours["ratio_to_resident"]):
            text += (f"; it runs at {bench.number(ours['ratio_to_resident']):.2f}x the resident model "
                     f"({bench.number(resident['decode_tok_s']):.2f} tok/s)")
        out.append(text + ".")
        air = by.get("airllm")
        if air and bench.number(air["decode_tok_s"]):
            out.append(f"**AirLLM ({setup}): {bench.number(air['decode_tok_s']):.2f} tok/s, "
                       f"{bench.number(air['ratio_to_resident']):.3f}x the resident model.** It streams every layer for "
                       "every token by design, so it is timed on one decode after the rounds, not interleaved.")
        cpu = by.get("accelerate-cpu")
        if cpu and not cpu["decode_tok_s"]:
            out.append(f"accelerate's CPU offload ({setup}): {cpu['note']}.")
    return out


def cold_answers(results: Path) -> list[str]:
    rows = [r for r in bench.read_rows(results / "cold.csv") if r["busy"] != "True" and bench.number(r["decode_ms_per_tok"])]
    if not rows:
        return []
    out = []
    rates = [bench.number(r["cold_read_bytes_s"]) for r in rows if bench.number(r["cold_read_bytes_s"])]
    if rates:
        out.append(f"The storage read rate each cold row measured (the streamed files read cold, one after another) "
                   f"ranges from {min(rates) / 1e9:.2f} to {max(rates) / 1e9:.2f} GB/s: the disk's rate moves between "
                   "measurements, which the model cannot know.")
    for label, cold in (("cold", "True"), ("from the page cache", "False")):
        mine = sorted((int(r["prefetch"]), bench.number(r["decode_ms_per_tok"])) for r in rows if r["cold_reads"] == cold)
        if mine:
            out.append(f"Stream decode {label}, ms per token by prefetch depth: "
                       + ", ".join(f"p{p} {ms:.0f}" for p, ms in mine) + ".")
    return out


def batch_answers(results: Path) -> list[str]:
    rows = [r for r in bench.read_rows(results / "batch.csv") if r["busy"] != "True" and bench.number(r["decode_ratio"])]
    if not rows:
        return []
    out = []
    def how(row: dict) -> str:  # a stream row copied or mapped its layers: two different costs
        return row["mode"] + (f" ({read_way(row)})" if row["mode"] == "stream" else "")

    for mode in dict.fromkeys(how(r) for r in rows):
        mine = [r for r in rows if how(r) == mode]
        sizes = sorted({int(r["batch_size"]) for r in mine})
        ratios = {b: [f"{bench.number(r['decode_ratio']):.2f}x" for r in mine if int(r["batch_size"]) == b] for b in sizes}
        text = (f"**{mode.capitalize()} against the resident model, same run**: "
                + ", ".join(f"batch {b} {' and '.join(ratios[b])}" for b in sizes))
        loads = {r["loads"] for r in mine}
        steps = {b: [bench.number(r["decode_ms_per_tok"]) for r in mine if int(r["batch_size"]) == b] for b in sizes}
        if len(sizes) > 1:
            text += (f"; a step grows from {min(steps[sizes[0]]):.0f} ms (batch {sizes[0]}) to "
                     f"{min(steps[sizes[-1]]):.0f}-{max(steps[sizes[-1]]):.0f} ms (batch {sizes[-1]})"
                     if len(steps[sizes[-1]]) > 1 else
                     f"; a step grows from {min(steps[sizes[0]]):.0f} ms (batch {sizes[0]}) to "
                     f"{steps[sizes[-1]][0]:.0f} ms (batch {sizes[-1]})")
            if len(loads) == 1:
                text += f", while the layer reads stay the same ({loads.pop()} per run at every batch size)"
        out.append(text + ".")
    return out


def profile_answers(results: Path) -> list[str]:
    rows = bench.read_rows(results / "profile.csv")
    if not rows:
        return []
    out, resident_ms = [], {}
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        run = [r for r in rows if r["run_id"] == run_id]
        modes = list(dict.fromkeys(r["mode"] for r in run))
        if len(modes) < 2:
            continue
        ms = {(r["mode"], r["op"]): bench.number(r["self_ms_per_step"]) for r in run}
        step = {r["mode"]: bench.number(r["step_ms"]) for r in run}
        diff = max(abs((ms.get((modes[-1], op)) or 0) - (ms.get((modes[0], op)) or 0)) for op in {r["op"] for r in run})
        out.append(f"Batch {run[0]['batch_size']}: a {modes[-1]} step's ops take {step[modes[-1]]:.0f} ms of CPU against "
                   f"{step[modes[0]]:.0f} ms {modes[0]}, and no op differs by more than {diff:.0f} ms.")
        resident_ms[int(run[0]["batch_size"])] = {op: v for (mode, op), v in ms.items() if mode == modes[0]}
    if len(resident_ms) > 1:
        lo, hi = min(resident_ms), max(resident_ms)
        common = set(resident_ms[lo]) & set(resident_ms[hi])
        if common:
            op = max(common, key=lambda o: resident_ms[hi][o] - resident_ms[lo][o])
            out.append(f"What grows most with the batch, resident: `{op}` ({resident_ms[lo][op]:.0f} -> "
                       f"{resident_ms[hi][op]:.0f} ms per step from batch {lo} to {hi}).")
    return out
