"""The run scripts' rows (results/baseline.csv, kvcache.csv, diskoffload.csv, ...): the table of
every row per machine kind, the exactness table (exactness.csv), the reference model beside
the original experiment, and results/memory.png and speed.png.

Rows are grouped by machine kind (device name and CPU vector extension): speed depends on
the machine and NF4 perplexity on its kernels, so nothing is compared across groups. A
variant row's ratios are its own: against the unpatched model timed in the same process
(run_id). Rows marked busy (other work shared the CPU while timing) are left out.
"""
from __future__ import annotations

from pathlib import Path

import bench
import estimate
import offload_skip
import sweep
from reporting import streaming
from reporting.tables import by_machine, column_table, fullest_machine, machine_kind, mb, num, percent

# (header, cell) of the table's columns; a cell gets the row dict of CSV strings.
TABLE = (
    ("csv", lambda r: r["file"].removesuffix(".csv")),
    ("variant", lambda r: r["variant"]),
    ("model", lambda r: r["model"]),
    ("quant", lambda r: r["quant"]),
    ("device", lambda r: r["device"]),
    ("offloaded", lambda r: _offloaded(r)),
    ("alpha", lambda r: r["alpha"]),
    ("mode", lambda r: _mode(r)),
    ("standby MB", lambda r: mb(r["standby_bytes"])),
    ("peak MB", lambda r: mb(r["peak_bytes"])),
    ("peak vs unpatched", lambda r: percent(r["peak_bytes"], r["baseline_standby_bytes"])),
    ("idle RSS MB", lambda r: mb(r["rss_bytes"])),
    ("PPL", lambda r: _ppl(r)),
    ("prefill s", lambda r: num(r["prefill_s"], ".3f")),
    ("decode tok/s", lambda r: num(r["decode_tok_s"], ".3g")),
    ("unpatched tok/s, same run", lambda r: num(r["baseline_decode_tok_s"], ".3g")),
    ("decode vs unpatched", lambda r: num(r["decode_ratio"], ".2f", "x")),
    ("generate tok/s", lambda r: num(r["generate_tok_s"], ".3g")),
    ("generate vs unpatched", lambda r: num(r["generate_ratio"], ".2f", "x")),
    ("loads/run", lambda r: num(r["loads"], "g")),
    ("wait s/run", lambda r: num(r["wait_s"], ".3f")),
    ("overlap", lambda r: num(r["overlap"], ".2f")),
    ("commit", lambda r: r["commit"]),
    ("date", lambda r: r["timestamp"][:10]),
)


def _offloaded(row: dict) -> str:
    n = len(row["layers_offloaded"].split())
    return f"{n}/{row['n_layers']}" + (f" ({row['layers']})" if row["layers"] else "")


def _mode(row: dict) -> str:
    parts = [row["mode"]]
    if row["mode"] == "stream":
        parts.append(f"prefetch {row['prefetch']}")
        if bench.number(row["budget_bytes"]):
            parts.append(f"budget {mb(row['budget_bytes'])} MB")
        if row["io_bandwidth"]:
            parts.append(f"{bench.number(row['io_bandwidth']) / 1e6:g} MB/s")
    if row["kv_cache"] == "False":
        parts.append("no KV cache")
    return ", ".join(parts)


def _ppl(row: dict) -> str:
    ppl = bench.number(row["ppl"])
    if ppl is None:
        return ""
    return f"{ppl:.3f} ({row['ppl_dataset']}, ctx {row['ppl_ctx']}, {row['ppl_tokens']} tok)"


# The exactness check's rows (check_exact.py -> exactness.csv, a schema of its own).
EXACTNESS_TABLE = (
    ("model", lambda r: r["model"]),
    ("quant", lambda r: r["quant"]),
    ("layers", lambda r: r["layers"]),
    ("form", lambda r: r["form"]),
    ("max abs dlogit", lambda r: num(r["max_abs_logit_diff"], ".3g")),
    ("logits equal", lambda r: r["logits_equal"]),
    ("greedy tokens equal", lambda r: f"{r['tokens_equal']} ({r['greedy_tokens']} tok)"),
    ("first divergence", lambda r: r["first_divergence"]),
    ("standby MB", lambda r: f"{mb(r['standby_bytes_before'])} -> {mb(r['standby_bytes_after'])}"),
    ("commit", lambda r: r["commit"]),
)


def load_rows(results_dir: Path) -> list[dict]:
    """Every row of every Result CSV in the directory (files with another schema, such as
    exactness.csv, and the study's suite CSVs are left out), files in name order, each row with a 'file' key; a column
    a file lacks (an older schema) reads as empty."""
    rows = []
    # the study's suites and the streaming files have sections of their own
    study = {f"{suite}.csv" for suite in sweep.SUITES} | set(streaming.FILES)
    for path in sorted(Path(results_dir).glob("*.csv")):
        if path.name in study:
            continue
        file_rows = bench.read_rows(path)
        if file_rows and "variant" not in file_rows[0]:
            continue
        for row in file_rows:
            rows.append({**{name: "" for name in bench.FIELDS}, **{k: v or "" for k, v in row.items()},
                         "file": path.name})
    return rows


LEAD_MODEL = "qwen2.5-coder-1.5b"
DUMMY_ORIGINAL = "dummy:qwen2.5-3b"  # the original's model's shape, with dummy weights
# The original experiment's own reported figures (REFERENCES.md), quoted beside ours, never
# measured here: estimate.ORIGINAL's, plus its peak while generating and its perplexity on
# five short sentences (naive x + (L(x) - x), before -> after offloading).
ORIGINAL = dict(estimate.ORIGINAL, peak_GB=1.93, ppl=(3.46, 3.43))
ORIGINAL_LAYERS = offload_skip.select_layers(estimate.QWEN25_3B["n_layers"], "even")


def latest(rows: list[dict], **match) -> dict | None:
    """The newest row that is not busy and matches every column=value (a callable value is a test)."""
    found = [r for r in rows if r["busy"] != "True"
             and all(v(r[k]) if callable(v) else r[k] == v for k, v in match.items())]
    return max(found, key=lambda r: r["timestamp"]) if found else None


def _newest_machine_rows(rows: list[dict], model: str) -> tuple[str, list[dict]]:
    """(machine kind, rows) of `model` in NF4 on the newest machine kind that has them."""
    nf4 = [r for r in rows if r["model"] == model and r["quant"] == "nf4"]
    if not nf4:
        return "", []
    machine = machine_kind(max(nf4, key=lambda r: r["timestamp"]))
    return machine, [r for r in nf4 if machine_kind(r) == machine]


def _gb(cell, binary: bool = False) -> str:
    value = bench.number(cell)
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB ({value / 1e9:.2f} GB)" if binary else f"{value / 1e9:.2f} GB"


def _change(new, old) -> str:
    new, old = bench.number(new), bench.number(old)
    return "" if new is None or not old else f" ({100 * (new / old - 1):+.0f}%)"


def _speed(row) -> str:
    if not row:
        return "-"
    return (f"{num(row['decode_tok_s'], '.2f')} vs {num(row['baseline_decode_tok_s'], '.2f')} tok/s unpatched, "
            f"same run: {num(row['decode_ratio'], '.2f', 'x')}")


def _repo_column(nf4: list[dict], binary: bool) -> list[str]:
    """This repo's cells of the original-beside-this-repo table, from one model's NF4 rows:
    layers, standby, while generating, session and stream decode (perplexity: perplexity_note)."""
    base = latest(nf4, variant="baseline", ppl=bool) or latest(nf4, variant="baseline")
    session = latest(nf4, variant="kvcache", decode_tok_s=bool)
    stream = latest(nf4, variant="diskoffload", decode_tok_s=bool, prefetch="0", kv_cache="True")
    first = session or stream or base
    offloaded = f"{len(first['layers_offloaded'].split())} of {first['n_layers']} ({first['layers']})" if first else "-"
    standby = (f"{_gb(first['baseline_standby_bytes'], binary)} -> {_gb(first['standby_bytes'], binary)}"
               f"{_change(first['standby_bytes'], first['baseline_standby_bytes'])}"
               if first and first["baseline_standby_bytes"] else "-")
    peak = ((f"session {_gb(session['peak_bytes'])}" if session else "session -")
            + (f"; stream {_gb(stream['peak_bytes'])}{_change(stream['peak_bytes'], stream['baseline_standby_bytes'])}"
               if stream else ""))
    return [offloaded, standby, peak, _speed(session), _speed(stream)]


def units_note(dummy_nf4: list[dict]) -> str:
    """The original's standby "GB" over this repo's count of the same shape's bytes, read as GiB and as 10^9."""
    row = next((r for r in (latest(dummy_nf4, variant=v) for v in ("kvcache", "diskoffload")) if r), None)
    if row is None:
        return ""
    counted = [bench.number(row["baseline_standby_bytes"]), bench.number(row["standby_bytes"])]
    ratios = {unit: [o * scale / c for o, c in zip(ORIGINAL["standby_GB"], counted)]
              for unit, scale in (("GiB", 2**30), ("10^9 bytes", 1e9))}
    return ("Units: the original's standby figures (unpatched, offloaded) over this repo's byte counts of the same "
            "shape, layers and quantisation: " + "; ".join(f"read as {unit}, {a:.3f}x and {b:.3f}x"
                                                            for unit, (a, b) in ratios.items()) + ".")


PERPLEXITY_NOTE = (
    "Perplexity is not comparable across these columns, so it is not in the table: the original's {before} -> "
    "{after} scores five short sentences one by one; {model} scores {tokens} tokens of {dataset} in windows of "
    "{ctx} ({ppl} unpatched{offloaded}). Other models, texts and context lengths: each figure means something only "
    "against its own unpatched model.")


def perplexity_note(rows: list[dict], model: str = LEAD_MODEL) -> str:
    """PERPLEXITY_NOTE from `model`'s newest NF4 baseline with a perplexity (and a streamed one at
    alpha 1 on the same tokens, where measured); '' without one."""
    _, nf4 = _newest_machine_rows(rows, model)
    base = latest(nf4, variant="baseline", ppl=bool)
    if base is None:
        return ""
    same = {k: base[k] for k in ("ppl_dataset", "ppl_tokens", "ppl_ctx")}
    stream = latest(nf4, variant="diskoffload", ppl=bool, alpha="1", **same)
    return PERPLEXITY_NOTE.format(
        before=ORIGINAL["ppl"][0], after=ORIGINAL["ppl"][1], model=model, tokens=base["ppl_tokens"],
        dataset=base["ppl_dataset"], ctx=base["ppl_ctx"], ppl=num(base["ppl"], ".2f"),
        offloaded=f", {num(stream['ppl'], '.2f')} streamed" if stream else "")


def lead_section(rows: list[dict], model: str = LEAD_MODEL) -> str:
    """The reference architecture beside the original experiment's reported figures: our
    newest rows of `model` in NF4 on the newest machine kind that has them, and of the
    original's own shape with dummy weights (DUMMY_ORIGINAL) where measured."""
    machine, nf4 = _newest_machine_rows(rows, model)
    if not nf4:
        return f"(no {model} NF4 rows yet: see reproduce.sh)"
    dummy_machine, dummy_nf4 = _newest_machine_rows(rows, DUMMY_ORIGINAL)
    o = ORIGINAL
    standby0, standby1 = o["standby_GB"]
    layers0 = ORIGINAL_LAYERS
    original = [f"{len(layers0)} of {estimate.QWEN25_3B['n_layers']} (even {layers0[0]}..{layers0[-1]})",
                f"{standby0} -> {standby1} \"GB\" ({100 * (standby1 / standby0 - 1):+.0f}%)",
                f"{o['peak_GB']} \"GB\": every offloaded layer reloaded",
                f"{o['resident_tok_s']} tok/s (own loop) vs {o['generate_tok_s']} tok/s (HF generate): two different loops",
                f"{o['disk_no_kv_tok_s']} tok/s, without KV cache"]
    columns = [original, _repo_column(nf4, binary=False)]
    headers = ["", "original: Qwen2.5-3B NF4, RTX 4050", f"this repo: {model} NF4, {machine}"]
    if dummy_nf4:
        columns.append(_repo_column(dummy_nf4, binary=True))
        headers.append(f"this repo: the original's shape, {DUMMY_ORIGINAL} NF4 (dummy weights), {dummy_machine}")
    labels = ["layers offloaded", "standby weights, unpatched -> offloaded", "weights while generating",
              "decode, session (all layers loaded per inference)",
              "decode, stream (each layer read when used)"]
    lines = [f"| {' | '.join(headers)} |", "|" + "---|" * len(headers)]
    lines += [f"| {label} | {' | '.join(column[k] for column in columns)} |" for k, label in enumerate(labels)]
    intro = (f"Generated by `python report.py` from results/*.csv: the newest {model} NF4 rows measured on {machine}, "
             "beside the original experiment's reported figures (Qwen2.5-3B NF4, bitsandbytes double quant, "
             "RTX 4050 laptop GPU)" + (f", and the original's own shape and layers with dummy weights "
                                       f"({DUMMY_ORIGINAL}: bytes and speed, no perplexity)" if dummy_nf4 else "")
             + ".")
    unit = "\n\n" + units_note(dummy_nf4) if dummy_nf4 else ""
    note = perplexity_note(rows, model)
    return intro + "\n\n" + "\n".join(lines) + unit + ("\n\n" + note if note else "")


def render(rows: list[dict], results_label: str) -> str:
    """One table per machine kind; busy rows left out (and counted)."""
    text = (f"Generated by `python report.py` from {results_label}/*.csv, one line per CSV row; bytes in MB "
            f"(10^6); ratios against the unpatched model of the same run. Column meanings: "
            f"`python report.py --columns`.")
    if not rows:
        return text + "\n\n(no results yet)"
    for machine, group in by_machine(rows).items():
        quiet = [r for r in group if r["busy"] != "True"]
        text += f"\n\n#### {machine}\n\n" + column_table(quiet, TABLE)
        if len(quiet) < len(group):
            text += (f"\n\n{len(group) - len(quiet)} row(s) left out: other work used more than "
                     f"{bench.BUSY_OTHER_CPU_SHARE:.0%} of the CPU while they were timed (column busy).")
    return text


def exactness_section(rows: list[dict], results_label: str) -> str:
    text = (f"Generated by `python report.py` from {results_label}/exactness.csv (made by "
            f"`python check_exact.py`), per machine kind.")
    for machine, group in by_machine(rows).items():
        text += f"\n\n#### {machine}\n\n" + column_table(group, EXACTNESS_TABLE)
    return text


def _label(row: dict, several_setups: bool) -> str:
    label = row["variant"]
    if row["mode"] == "stream":
        label += f" p{row['prefetch']}"
        if bench.number(row["budget_bytes"]):
            label += f" b{mb(row['budget_bytes'])}M"
        if row["io_bandwidth"]:
            label += f" {bench.number(row['io_bandwidth']) / 1e6:g}MB/s"
    if row["kv_cache"] == "False":
        label += " no-kv"
    if several_setups:
        label += f"\n{row['model']} {row['quant']} {row['device']}"
    return label


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """memory.png (standby and peak weight MB) and speed.png (decode and generate tok/s)
    of the timed rows, the latest row for each configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # dummy weights' bytes and speeds are real, but they have tables of their own (the original's
    # shape, larger than the device); the plots stay with the models that have real weights
    timed = [r for r in rows if bench.number(r["decode_tok_s"]) is not None and r["busy"] != "True"
             and r["weights"] != "dummy"]
    if not timed:
        return []
    machine = fullest_machine(timed, lambda r: (r["model"], r["quant"], r["device"]))  # plots show one machine kind
    timed = [r for r in timed if machine_kind(r) == machine]
    several = len({(r["model"], r["quant"], r["device"]) for r in timed}) > 1
    latest = {}
    for row in timed:  # later rows win: the newest measurement of a configuration
        latest[_label(row, several)] = row
    order = {variant: k for k, variant in enumerate(bench.VARIANTS)}
    labels = sorted(latest, key=lambda label: order.get(latest[label]["variant"], len(order)))  # stable
    x = range(len(labels))
    width = 0.4
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, series, ylabel, title in (
        ("memory.png", (("standby", "standby_bytes", 1e6), ("peak", "peak_bytes", 1e6)),
         "weights resident on the device (MB)", "Resident weight bytes: idle vs during inference"),
        ("speed.png", (("decode loop", "decode_tok_s", 1), ("generate", "generate_tok_s", 1)),
         "tokens / s", "Decode speed (greedy, median of repeats)"),
    ):
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.5))
        top = 0.0
        for k, (legend, column, scale) in enumerate(series):
            cells = [bench.number(latest[label][column]) for label in labels]
            values = [(cell or 0) / scale for cell in cells]
            bars = ax.bar([i + (k - 0.5) * width for i in x], values, width, label=legend)
            ax.bar_label(bars, ["" if cell is None else f"{value:.3g}" for cell, value in zip(cells, values)],
                         fontsize=7)  # an empty cell is not measured, not zero
            top = max(top, *values)
        ax.set_ylim(0, 1.25 * top or 1)  # room for the legend and the value labels
        ax.set_xticks(list(x), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{machine}", fontsize=10)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def lead_answers(rows: list[dict], results: Path, model: str = LEAD_MODEL) -> list[str]:
    """Why the savings differ from the original's, and how to read the speed ratios: sentences
    computed from the rows (the lead model's byte breakdown comes from beyond.csv)."""
    out = []
    parts = next((r for r in bench.read_rows(Path(results) / "beyond.csv") if r["model"] == model
                  and r["variant"] == "baseline" and r["quant_head"] in ("none", "")), None)
    session = latest([r for r in rows if r["model"] == model and r["quant"] == "nf4"], variant="kvcache")
    if parts and session and bench.number(parts["embedding_bytes"]) is not None:
        freed = bench.number(session["baseline_standby_bytes"]) - bench.number(session["standby_bytes"])
        resident = bench.number(parts["embedding_bytes"]) + bench.number(parts["head_bytes"])
        out.append(f"Offloading decoder layers saves only the layers' share of the weights. {model} (NF4) keeps its "
                   f"input embedding and output head resident: {mb(parts['embedding_bytes'])} + "
                   f"{mb(parts['head_bytes'])} MB of its {mb(parts['standby_bytes'])} MB, "
                   + ("more than" if resident > freed else "less than")
                   + f" the {mb(freed)} MB its {len(session['layers_offloaded'].split())} offloaded layers free "
                   f"(see the beyond-the-layers section for moving those too).")
    # a session computes what the unpatched model computes: its ratios are the noise of one ratio
    noise = [bench.number(r["decode_ratio"]) for r in rows if r["quant"] == "nf4" and r["busy"] != "True"
             and r["variant"] == "kvcache" and bench.number(r["decode_ratio"])]
    if noise:
        out.append(f"On a CPU the \"device\" is host memory and a session's load is a copy from the page cache; every "
                   f"ratio is against the same machine's unpatched model, timed interleaved in the same process. A "
                   f"session decodes with exactly the unpatched model's computation, and its paired NF4 ratios below "
                   f"spread from {min(noise):.2f}x to {max(noise):.2f}x: that is the noise of one ratio, not a "
                   "speed-up; a stream ratio below that spread is the cost of its reads.")
    return out


def nf4_cpu_answers(rows: list[dict]) -> list[str]:
    """How much slower NF4 decodes than bf16 on each machine kind, from the baseline rows."""
    out = []
    for machine, group in by_machine(rows).items():
        for model in dict.fromkeys(r["model"] for r in group):
            bf16 = latest(group, model=model, variant="baseline", quant="bf16", decode_tok_s=bool)
            nf4 = latest(group, model=model, variant="baseline", quant="nf4", decode_tok_s=bool)
            if bf16 and nf4:
                ratio = bench.number(bf16["decode_tok_s"]) / bench.number(nf4["decode_tok_s"])
                out.append(f"{machine}, {model} unpatched: bf16 decodes {num(bf16['decode_tok_s'], '.2f')} tok/s, NF4 "
                           f"{num(nf4['decode_tok_s'], '.2f')} tok/s ({ratio:.1f}x "
                           + ("slower" if ratio > 1 else "faster") + " in NF4).")
    return out
