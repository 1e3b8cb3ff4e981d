"""Past the layers: where the resident bytes are, and what offloading the input embedding's rows
and an NF4 output head win, from results/beyond.csv (``python sweep.py beyond``). Every number
comes from a row."""
from __future__ import annotations

from pathlib import Path

import bench
from reporting.tables import commits, machine_kind, markdown_table, mb, missing, save_figure, suite_rows, unpatched_row

SUITE = "beyond"
# The stacked parts of a bar: standby parts (they sum to standby_bytes), then the offloaded
# layers' buffers at the peak on top (standby + that = peak_bytes).
PARTS = (("embedding_bytes", "input embedding"), ("head_bytes", "output head"),
         ("resident_layers_bytes", "resident layers"), ("other_bytes", "other (norms, rotary)"),
         ("offloaded_buffer_bytes", "offloaded layers, at the peak"))


def step(row: dict) -> str:
    """What a row adds, in the suite's order."""
    if row["variant"] == "baseline":
        return "unpatched" + (" + NF4 head" if row["quant_head"] == "nf4" else "")
    label = "layers offloaded"
    if row["embedding_residency"] == "disk":
        label += " + embedding rows"
    elif row["embedding_residency"] == "tied":
        label += " + embedding (tied: kept)"
    if row["quant_head"] == "nf4":
        label += " + NF4 head"
    return label + (", streamed" if row["mode"] == "stream" else "")


def short_step(row: dict) -> str:
    """The step in a few characters, for a plot's axis."""
    if row["variant"] == "baseline":
        return "unpatched" + ("\n+ NF4 head" if row["quant_head"] == "nf4" else "")
    if row["mode"] == "stream":
        return "streamed"
    if row["quant_head"] == "nf4":
        return "+ NF4 head"
    return {"disk": "+ embedding\nrows", "tied": "+ embedding\n(tied: kept)"}.get(row["embedding_residency"], "layers")


def _ppl(row: dict, base: dict | None) -> str:
    ppl = bench.number(row["ppl"])
    if ppl is None:
        return ""
    if base is None or base is row or base["ppl_tokens"] != row["ppl_tokens"]:
        return f"{ppl:.3f}"
    base_ppl = bench.number(base["ppl"])
    return f"{ppl:.3f} (= unpatched)" if ppl == base_ppl else f"{ppl:.3f} ({100 * (ppl / base_ppl - 1):+.2f}%)"


def _speed(row: dict) -> str:
    tok_s = bench.number(row["decode_tok_s"])
    if tok_s is None:
        return ""
    if row["busy"] == "True":
        return "busy"
    ratio = bench.number(row["decode_ratio"])
    return f"{tok_s:.2f}" + (f" ({ratio:.2f}x)" if ratio else "")


def beyond_section(results: Path) -> str:
    rows = suite_rows(results, SUITE)
    if not rows:
        return missing(f"{SUITE}.csv", f"python sweep.py {SUITE}")
    lines = []
    for row in rows:
        base = unpatched_row(rows, row)
        standby = bench.number(row["standby_bytes"])
        share = f"{100 * standby / bench.number(base['standby_bytes']):.0f}%" if base and standby else ""
        lines.append([row["model"], step(row), mb(row["standby_bytes"]), share, mb(row["peak_bytes"]),
                      mb(row["embedding_bytes"]), mb(row["head_bytes"]), mb(row["resident_layers_bytes"]),
                      _speed(row), _ppl(row, base)])
    headers = ["model", "step", "standby MB", "of unpatched", "peak MB", "embedding MB", "head MB",
               "resident layers MB", "decode tok/s (x same-run unpatched)", "PPL"]
    setups = sorted({f"{machine_kind(r)}, torch {r['torch']}" for r in rows})
    weights = ", ".join(sorted({r["quant"].upper() for r in rows}))
    scored = sorted({f"{r['ppl_dataset']}, ctx {r['ppl_ctx']}" for r in rows if r["ppl"]})
    tokens = sorted({f"{r['model']}: {r['ppl_tokens']} tokens" for r in rows if r["ppl"]})
    tied = sorted({r["model"] for r in rows if r["tied_embeddings"] == "True"})
    return (f"From results/{SUITE}.csv (`python sweep.py {SUITE}`; weights {weights}; {'; '.join(setups)}; "
            f"commit {commits(rows)}). Perplexity on {'; '.join(scored)} "
            f"({', '.join(tokens)}). Checkpoints whose head is tied to the input embedding: "
            f"{', '.join(tied) or 'none'}. Decode speed: greedy, KV cache; in brackets its ratio to the "
            "unpatched model timed in the same process, with the same head (so a ratio compares residency, "
            "and the NF4 head's own cost shows in the tok/s against the unpatched row); busy rows (other "
            "work on the CPU) show no speed.\n\n"
            + markdown_table(headers, lines))


def sections(results_dir: Path) -> dict[str, str]:
    """Block name -> markdown."""
    return {SUITE: beyond_section(Path(results_dir))}


def plots(results_dir: Path) -> list[Path]:
    """beyond.png: per model, one stacked bar per step: where the resident bytes are."""
    rows = suite_rows(results_dir, SUITE)
    if not rows:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models) + 1, 4.8), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, model in zip(axes[0], models):
        shown = [r for r in rows if r["model"] == model]
        bottom = [0.0] * len(shown)
        for k, (column, label) in enumerate(PARTS):
            heights = [(bench.number(r[column]) or 0) / 1e6 for r in shown]
            ax.bar(range(len(shown)), heights, bottom=bottom, color=colors[k], label=label,
                   hatch="//" if column == "offloaded_buffer_bytes" else None, alpha=0.6 if k == 4 else 1.0)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(len(shown)), [short_step(r) for r in shown], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{model} ({shown[0]['quant']})", fontsize=9)
        ax.set_ylabel("MB on the device")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle("Where the resident bytes are (standby), and the offloaded layers at the peak", fontsize=10)
    return [save_figure(fig, Path(results_dir) / "beyond.png")]
