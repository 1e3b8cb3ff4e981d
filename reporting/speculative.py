"""Speculative decoding over stream residency (results/speculative.csv): the table, the plot of
speed and streamed bytes per token against the draft's resident bytes, and sentences computed
from the rows."""
from __future__ import annotations

from pathlib import Path

import bench

from .tables import commits, machines, markdown_table, mb, missing, num, save_figure

CSV = "speculative.csv"
COMMAND = "python sweep.py speculative"


def rows(results: Path) -> list[dict]:
    """The measured rows, busy ones left out (their speed says what else ran)."""
    return [r for r in bench.read_rows(results / CSV) if r["busy"] != "True" and bench.number(r["vs_plain"])]


def reads(row: dict) -> str:
    if row["cold_reads"] != "True":
        return "page cache"
    return "cold" + (f", read-ahead {row['prefetch']}" if row["prefetch"] not in ("", "0") else "")


def _exact(row: dict) -> str:
    if row["tokens_equal"] == "True":
        return "equal"
    return f"{row['prompts_differing']} differ (gap <= {bench.number(row['max_diff_gap']):.3g})"


def section(results: Path) -> str:
    found = rows(results)
    if not found:
        return missing(CSV, COMMAND)
    lines = [[r["quant"], reads(r), r["prompt_kind"], r["draft"], mb(r["draft_bytes"]),
              num(r["accepted_per_verify"], ".2f"), num(r["drafted_per_verify"], ".1f"),
              f"{bench.number(r['read_bytes_per_token']) / 1e6:.0f} / {bench.number(r['plain_read_bytes_per_token']) / 1e6:.0f}",
              num(r["decode_tok_s"], ".2f"), num(r["plain_decode_tok_s"], ".2f"), num(r["vs_plain"], ".2f", "x"),
              num(r.get("resident_decode_tok_s"), ".2f"), _exact(r)] for r in found]
    headers = ["target", "reads", "prompts", "draft", "draft MB", "tokens per verify", "drafted per verify",
               "streamed MB per token (draft / plain)", "tok/s", "plain stream tok/s", "vs plain",
               "resident tok/s", "tokens vs plain"]
    first = found[0]
    return (f"From results/{CSV} (`{COMMAND}`; {first['model']} with layers {first['layers_offloaded']} streamed, "
            f"{first['prompts']} prompts of each kind x {first['max_new_tokens']} tokens; {machines(found)}; "
            f"commit {commits(found)}). Each row times, prompt by prompt in one process: the resident model, plain "
            "stream decoding and speculative decoding over the same stream.\n\n" + markdown_table(headers, lines))


def answers(results: Path, prompt_kinds: tuple[str, ...] | None = None,
            read_kinds: tuple[str, ...] | None = None) -> list[str]:
    """The best draft per target, reads and prompt kind (only `prompt_kinds` and `read_kinds` if
    given), what it costs and saves; then the exactness over every row."""
    found = rows(results)
    out = []
    for key in dict.fromkeys((r["quant"], reads(r), r["prompt_kind"]) for r in found
                             if (prompt_kinds is None or r["prompt_kind"] in prompt_kinds)
                             and (read_kinds is None or reads(r) in read_kinds)):
        group = [r for r in found if (r["quant"], reads(r), r["prompt_kind"]) == key]
        best = max(group, key=lambda r: bench.number(r["vs_plain"]))
        worst = min(group, key=lambda r: bench.number(r["vs_plain"]))
        quant, how, kind = key
        text = (f"{quant} target, {how}, {kind} prompts: the best draft, {best['draft']}, decodes at "
                f"{bench.number(best['vs_plain']):.2f}x plain stream decoding ({bench.number(best['accepted_per_verify']):.1f} "
                f"tokens per target forward, so {bench.number(best['read_bytes_per_token']) / bench.number(best['plain_read_bytes_per_token']):.2f}x "
                f"the streamed bytes per token; it adds {bench.number(best['draft_bytes']) / 1e6:.0f} MB resident)")
        if worst is not best:
            text += f"; the slowest, {worst['draft']}, at {bench.number(worst['vs_plain']):.2f}x"
        out.append(text + ".")
    differ = [r for r in found if r["tokens_equal"] != "True"]
    if found:
        if differ:
            gaps = [bench.number(r["max_diff_gap"]) for r in differ]
            out.append(f"Tokens: {len(found) - len(differ)} of {len(found)} rows equal plain stream decoding on every "
                       f"prompt; in the others a token differs where the target's top two logits are at most "
                       f"{max(gaps):.3g} apart (a verify forward over several positions rounds differently).")
        else:
            out.append(f"Tokens: every row equals plain stream decoding on every prompt ({len(found)} rows).")
    return out


def plot(results: Path) -> list[Path]:
    found = rows(results)
    if not found:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key in dict.fromkeys((r["quant"], reads(r), r["prompt_kind"]) for r in found):
        group = sorted((r for r in found if (r["quant"], reads(r), r["prompt_kind"]) == key),
                       key=lambda r: bench.number(r["draft_bytes"]))
        x = [bench.number(r["draft_bytes"]) / 1e6 for r in group]
        label = " / ".join(key)
        speed_ax.plot(x, [bench.number(r["vs_plain"]) for r in group], "o-", label=label)
        bytes_ax.plot(x, [bench.number(r["read_bytes_per_token"]) / bench.number(r["plain_read_bytes_per_token"])
                          for r in group], "o-", label=label)
        for r, xi in zip(group, x):
            speed_ax.annotate(r["draft"].replace("qwen2.5-coder-", ""), (xi, bench.number(r["vs_plain"])), fontsize=6)
    speed_ax.axhline(1, color="gray", ls=":")
    speed_ax.set_xlabel("draft's resident MB")
    speed_ax.set_ylabel("decode tok/s vs plain stream decoding")
    bytes_ax.set_xlabel("draft's resident MB")
    bytes_ax.set_ylabel("streamed bytes per token vs plain")
    speed_ax.legend(fontsize=7)
    fig.suptitle(f"Speculative decoding over stream residency: {found[0]['model']} (target quant / reads / prompts)")
    return [save_figure(fig, results / "speculative.png")]
