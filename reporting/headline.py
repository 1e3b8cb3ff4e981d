"""README.md's headline blocks: each a few lines from results/*.csv, ending with a link to
its full section in results/README.md (the caller passes the link). Every number is a row's."""
from __future__ import annotations

from pathlib import Path

import bench
import estimate
from reporting import beyond, fit, load, runs, speculative, streaming, study
from reporting.tables import by_machine, fullest_machine, machine_kind, machines, markdown_table, mb, num, suite_rows, unpatched_row


def _ratio(cell) -> str:
    value = bench.number(cell)
    return "" if value is None else f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def more(link: str, what: str = "the full tables") -> str:
    return f"More: [{what}]({link})."


def original(rows: list[dict], link: str) -> str:
    parts = runs.lead_section(rows).split("\n\n")
    # the table and the perplexity note; the source paragraph and the units note stay on the results page
    kept = [p for p in parts[1:] if not p.startswith("Units:")]
    return "\n\n".join(kept) + "\n\n" + more(link, "how the savings differ, the units, and every row")


# check_exact.py's forms that differ from the original by construction: not part of "alpha = 1 is exact"
APPROXIMATE_FORMS = ("naive", "host")


def exactness(rows: list[dict], link: str) -> str:
    """Per machine kind and model: alpha = 1 equal or not in each format, and the naive form's logit gap."""
    if not rows:
        return "No rows in results/exactness.csv yet: run `python check_exact.py`."
    lines, quants = [], list(dict.fromkeys(r["quant"] for r in rows))
    for machine, group in by_machine(rows).items():
        for model in dict.fromkeys(r["model"] for r in group):
            mine = [r for r in group if r["model"] == model]
            exact = [r for r in mine if r["form"] not in APPROXIMATE_FORMS]
            equal = all(r["logits_equal"] == "True" and r["tokens_equal"] == "True" for r in exact)
            tested = list(dict.fromkeys(r["quant"] for r in exact))
            naive = {r["quant"]: num(r["max_abs_logit_diff"], ".3g") for r in mine if r["form"] == "naive"}
            lines.append([machine, model, f"{'yes' if equal else 'NO'}: {', '.join(tested)} "
                          f"({', '.join(dict.fromkeys(r['form'] for r in exact))})"] + [naive.get(q, "") for q in quants])
    headers = ["machine", "model", "alpha = 1: logits and greedy tokens equal"] + [
        f"naive form, max abs dlogit: {q}" for q in quants]
    return markdown_table(headers, lines) + "\n\n" + more(link)


def streaming_memory(rows: list[dict], link: str) -> str:
    """Per model on one machine kind (the one with the most models measured, the newest among
    equals: a short block that still compares models): what session and stream residency hold,
    idle and while generating, and their same-run decode ratio."""
    # dummy weights have a table of their own (the original's shape, the larger-than-the-device rows)
    timed = [r for r in rows if r["busy"] != "True" and r["variant"] in ("kvcache", "diskoffload")
             and r["weights"] != "dummy"]
    if not timed:
        return "No variant rows yet: run `python run_kvcache.py` and `python run_diskoffload.py`."
    machine = fullest_machine(timed, lambda r: (r["model"], r["quant"]))
    lines = []
    for key in dict.fromkeys((r["model"], r["quant"]) for r in timed if machine_kind(r) == machine):
        mine = [r for r in timed if (r["model"], r["quant"]) == key and machine_kind(r) == machine]
        session = runs.latest(mine, variant="kvcache")
        stream = runs.latest(mine, variant="diskoffload", prefetch="0") or runs.latest(mine, variant="diskoffload")
        first = session or stream
        lines.append([*key, f"{mb(first['baseline_standby_bytes'])} -> {mb(first['standby_bytes'])}",
                      mb(session["peak_bytes"]) if session else "", mb(stream["peak_bytes"]) if stream else "",
                      num(session["decode_ratio"], ".2f", "x") if session else "",
                      num(stream["decode_ratio"], ".2f", "x")
                      + (f" ({'mapped' if streaming.read_way(stream) == 'map' else 'copied'})"
                         if stream and stream["device"] == "cpu" else "") if stream else ""])
    headers = ["model", "quant", "standby MB, unpatched -> offloaded", "peak MB, session", "peak MB, stream",
               "decode vs unpatched, session", "stream"]
    # A session computes exactly what the unpatched model computes (its layers are all loaded before
    # the timed decode), so its paired ratios show how far a ratio moves by noise alone here.
    noise = [bench.number(r["decode_ratio"]) for r in timed if machine_kind(r) == machine
             and r["variant"] == "kvcache" and bench.number(r["decode_ratio"])]
    spread = (f" Session ratios, same computation as the unpatched model, spread from {min(noise):.2f}x to "
              f"{max(noise):.2f}x: that is the noise of one ratio; a stream ratio below it is a cost."
              if noise else "")
    return (f"{machine}; ratios against the unpatched model timed in the same process.{spread}\n\n"
            + markdown_table(headers, lines) + "\n\n" + more(link, "every row"))


def peers(results: Path, link: str) -> str:
    rows = bench.read_rows(results / "peers.csv")
    if not rows:
        return "No rows in results/peers.csv yet: run `python run_peers.py`."
    machine = machine_kind(max(rows, key=lambda r: r["timestamp"]))  # the newest kind only: a short block
    lines = []
    for run in streaming.latest_peer_runs([r for r in rows if machine_kind(r) == machine]):
        way = streaming.peer_read_way(run)
        for r in run:
            if bench.number(r["decode_tok_s"]):
                system = r["system"] + (f" ({'mapped' if way == 'map' else 'copied'})" if r["system"] == "stream" else "")
                lines.append([r["model"], r["quant"], system, num(r["decode_tok_s"], ".2f"),
                              _ratio(r["ratio_to_resident"]), mb(r["idle_bytes"]), mb(r["peak_bytes"])])
    headers = ["model", "quant", "system", "decode tok/s", "vs resident, same run", "idle MB", "peak MB"]
    return (f"{machine}; each run times its systems in interleaved rounds.\n\n" + markdown_table(headers, lines) + "\n\n"
            + more(link, "the peers, cold reads, batches and a decode step op by op"))


def cpu_read(results: Path, link: str) -> str:
    """One line over every configuration measured both ways (the per-case lines: results/README.md)."""
    line = streaming.cpu_read_line(results)
    if line is None:
        return "No pairs in results/cpu_read.csv yet: run `python sweep.py cpu_read`."
    return line + " " + more(link, "each configuration, every row, with RSS by kind")


def speculative_decoding(results: Path, link: str) -> str:
    """One line: the best draft from the page cache and from a cold disk, and the slow rows (the
    tables, the plot and the GPU prediction: results/README.md)."""
    line = speculative.headline(results)
    if line is None:
        return "No rows in results/speculative.csv yet: run `python sweep.py speculative`."
    return line + " " + more(link, "the best draft per case, every row, the plot, the GPU prediction for every draft")


def study_answers(results: Path, links: dict[str, str], titles: dict[str, str]) -> str:
    """One line per suite: its question, its answer, a link."""
    found = study.answers(results)
    if not found:
        return "No study rows yet: run `python sweep.py <suite>` (see results/README.md)."
    def title(suite: str) -> str:
        return titles[suite] if titles[suite].endswith("?") else titles[suite] + ":"
    return "\n".join(f"- **{title(suite)}** {line} [More]({links[suite]})." for suite, (line, _) in found.items())


def load_peaks(results: Path, link: str) -> str:
    """One sentence per model and quantisation: the unpatched load peak, each variant's, and
    whether its perplexity equals the unpatched one."""
    rows = suite_rows(results, load.SUITE)
    if not rows:
        return "No rows in results/load.csv yet: run `python sweep.py load`."
    sentences = []
    for model, quant in dict.fromkeys((r["model"], r["quant"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["quant"]) == (model, quant)]
        base = unpatched_row(rows, mine[0])
        parts = [f"{r['variant']} {mb(r['load_peak_bytes'])} MB"
                 + (f" (saved {mb(load.saved_bytes(r, base, 'load_peak_bytes'))} MB, perplexity "
                    + ("= unpatched" if r["ppl"] == base["ppl"] else "differs") + ")" if base is not None else "")
                 for r in mine if r is not base]
        lead = f"{model} {quant}: load peak" + (f" {mb(base['load_peak_bytes'])} MB unpatched" if base else "")
        sentences.append(lead + ("; " if parts else "") + "; ".join(parts) + ".")
    return (f"{machines(rows)}. " + " ".join(sentences) + " " + more(link, "the host memory peaks and load times"))


def large_shapes(results: Path, link: str) -> str:
    """The 7B and 14B shapes streamed within 6 GiB: device bytes and decode speed against the bound."""
    checks = load.large_checks(results)
    if not checks:
        return f"No rows in results/{estimate.LARGE_CSV} yet: run `{load.LARGE_COMMAND}`."
    headers, lines = load.large_lines(checks, full=False)
    return markdown_table(headers, lines) + "\n\n" + more(link, "the read rates, estimate.py's predictions, the load peaks")


def beyond_levers(results: Path, link: str) -> str:
    """Per model: the unpatched standby, the exact levers' and all levers' standby, and the NF4 head's cost."""
    rows = suite_rows(results, beyond.SUITE)
    if not rows:
        return "No rows in results/beyond.csv yet: run `python sweep.py beyond`."
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = unpatched_row(rows, mine[0])
        if base is None:
            continue
        exact = [r for r in mine if r["variant"] != "baseline" and r["quant_head"] in ("none", "")]
        approx = [r for r in mine if r["quant_head"] == "nf4" and r["variant"] != "baseline"]
        whole = bench.number(base["standby_bytes"])

        def share(row) -> str:
            return f"{mb(row['standby_bytes'])} ({100 * bench.number(row['standby_bytes']) / whole:.0f}%)" if row else ""
        best_exact = min(exact, key=lambda r: bench.number(r["standby_bytes"]), default=None)
        best = min(approx, key=lambda r: bench.number(r["standby_bytes"]), default=None)
        ppl, base_ppl = (bench.number(best["ppl"]), bench.number(base["ppl"])) if best else (None, None)
        lines.append([model, mb(base["standby_bytes"]), share(best_exact), share(best),
                      f"{100 * (ppl / base_ppl - 1):+.2f}%" if ppl and base_ppl else ""])
    headers = ["model (NF4)", "unpatched standby MB", "exact levers: layers + embedding rows", "+ NF4 head (approximate)",
               "NF4 head's PPL cost"]
    return markdown_table(headers, lines) + "\n\n" + more(link, "every step, peaks and speeds")


def fit_plan(results: Path, link: str) -> str:
    """The plan against the fastest configuration that fits and today's defaults, one line per case."""
    table = fit.headline(results)
    if table is None:
        return f"No rows in results/fit.csv yet: run `{fit.COMMAND}`."
    return table + "\n\n" + more(link, "every configuration, the 6 GB card's plan")
