"""Speculative decoding over stream residency (results/speculative.csv): the table, the plot of
speed and streamed bytes per token against the draft's resident bytes, and sentences computed
from the rows."""
from __future__ import annotations

from pathlib import Path

import bench
import estimate

from .tables import commits, machine_kind, machines, markdown_table, mb, missing, num, save_figure

CSV = "speculative.csv"
COMMAND = "python sweep.py speculative"


def rows(results: Path) -> list[dict]:
    """The measured rows, busy ones left out (their speed says what else ran)."""
    return [r for r in bench.read_rows(results / CSV) if r["busy"] != "True" and bench.number(r["vs_plain"])]


DEFAULT_SCHEDULE = "adaptive"
SLOW = 0.9  # the bar: at its default settings no draft slower than this against plain stream decoding


def schedule(row: dict) -> str:
    """Rows written before the schedule column asked the draft at every verify."""
    return row.get("schedule") or "constant"


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
    lines = [[r["quant"], reads(r), r["prompt_kind"], r["draft"], schedule(r), r.get("plain_steps") or "",
              mb(r["draft_bytes"]), num(r["accepted_per_verify"], ".2f"), num(r["drafted_per_verify"], ".1f"),
              f"{bench.number(r['read_bytes_per_token']) / 1e6:.0f} / {bench.number(r['plain_read_bytes_per_token']) / 1e6:.0f}",
              num(r["decode_tok_s"], ".2f"), num(r["plain_decode_tok_s"], ".2f"), num(r["vs_plain"], ".2f", "x"),
              num(r.get("resident_decode_tok_s"), ".2f"), _exact(r)] for r in found]
    headers = ["target", "reads", "prompts", "draft", "schedule", "plain steps", "draft MB", "tokens per verify",
               "drafted per verify",
               "streamed MB per token (draft / plain)", "tok/s", "plain stream tok/s", "vs plain",
               "resident tok/s", "tokens vs plain"]
    first = found[0]
    return (f"From results/{CSV} (`{COMMAND}`; {first['model']} with layers {first['layers_offloaded']} streamed, "
            f"{first['prompts']} prompts of each kind x {first['max_new_tokens']} tokens; {machines(found)}; "
            f"commit {commits(found)}). Each row times, prompt by prompt in one process: the resident model, plain "
            "stream decoding and speculative decoding over the same stream. Schedule: adaptive (the default) asks the "
            "draft only while the run's own timings say drafting is faster, and counts the verifies it ran as plain "
            "steps; constant asks at every verify (transformers' schedule; rows without a schedule are constant).\n\n"
            + markdown_table(headers, lines))


def _groups(found: list[dict], prompt_kinds, read_kinds) -> dict[tuple, list[dict]]:
    """(target quant, reads, prompt kind) -> its rows of the default schedule, or, where none was
    measured at the default, its other rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in found:
        if (prompt_kinds is None or r["prompt_kind"] in prompt_kinds) and (read_kinds is None or reads(r) in read_kinds):
            groups.setdefault((r["quant"], reads(r), r["prompt_kind"]), []).append(r)
    return {key: [r for r in group if schedule(r) == DEFAULT_SCHEDULE] or group for key, group in groups.items()}


def best_rows(results: Path, prompt_kinds: tuple[str, ...] | None = None,
              read_kinds: tuple[str, ...] | None = None) -> list[tuple[dict, dict]]:
    """(best, slowest) row per target, reads and prompt kind, at the default schedule where measured."""
    by = lambda r: bench.number(r["vs_plain"])  # noqa: E731
    return [(max(group, key=by), min(group, key=by)) for group in _groups(rows(results), prompt_kinds, read_kinds).values()]


def answers(results: Path, prompt_kinds: tuple[str, ...] | None = None,
            read_kinds: tuple[str, ...] | None = None) -> list[str]:
    """The best draft per target, reads and prompt kind (only `prompt_kinds` and `read_kinds` if
    given), what it costs and saves, at the default schedule where measured; then `notes`."""
    out = []
    for best, worst in best_rows(results, prompt_kinds, read_kinds):
        text = (f"{best['quant']} target, {reads(best)}, {best['prompt_kind']} prompts, {schedule(best)} schedule: the "
                f"best draft, {best['draft']}, decodes at {bench.number(best['vs_plain']):.2f}x plain stream decoding "
                f"({bench.number(best['accepted_per_verify']):.1f} tokens per target forward, so "
                f"{bench.number(best['read_bytes_per_token']) / bench.number(best['plain_read_bytes_per_token']):.2f}x "
                f"the streamed bytes per token; it adds {bench.number(best['draft_bytes']) / 1e6:.0f} MB resident)")
        if worst is not best:
            text += f"; the slowest, {worst['draft']}, at {bench.number(worst['vs_plain']):.2f}x"
        out.append(text + ".")
    return out + notes(results)


def best_table(results: Path) -> str:
    """The best draft per target, reads and prompt kind (at the default schedule where measured),
    beside the slowest draft of the same group, as a markdown table ('' without rows)."""
    pairs = best_rows(results)
    if not pairs:
        return ""
    return markdown_table(
        ["target", "reads", "prompts", "schedule", "best draft", "vs plain stream", "tokens per verify",
         "streamed bytes per token", "draft MB", "slowest draft"],
        [[b["quant"], reads(b), b["prompt_kind"], schedule(b), b["draft"],
          num(b["vs_plain"], ".2f", "x"), num(b["accepted_per_verify"], ".1f"),
          f"{bench.number(b['read_bytes_per_token']) / bench.number(b['plain_read_bytes_per_token']):.2f}x",
          mb(b["draft_bytes"]), f"{w['draft']} {bench.number(w['vs_plain']):.2f}x" if w is not b else ""]
         for b, w in pairs])


HEADLINE = ("{machines}, {model} target: the best draft decodes at {page_vs}x plain stream decoding from the page "
            "cache ({page_draft}, {page_quant}, {page_prompts} prompts, {page_tpv} tokens per verify, {default} "
            "schedule) and at {cold_vs}x from a cold disk ({cold_draft}, {cold_quant}, {cold_schedule} schedule); at the "
            "{default} schedule {slow} of {rows} rows run below {bar}x plain.")


def headline(results: Path) -> str | None:
    """HEADLINE filled from the best rows: the fastest from the page cache at the default schedule,
    the fastest from a cold disk; None without rows."""
    found, pairs = rows(results), best_rows(results)
    page = [b for b, _ in pairs if reads(b) == "page cache" and schedule(b) == DEFAULT_SCHEDULE]
    cold = [b for b, _ in pairs if reads(b) != "page cache"]
    if not page or not cold:
        return None
    by = lambda r: bench.number(r["vs_plain"])  # noqa: E731
    best_page = max(page, key=by)
    # the block speaks of one target on one machine kind: the best page-cache row's
    same = [r for r in found if (r["model"], machine_kind(r)) == (best_page["model"], machine_kind(best_page))]
    best_cold = max([b for b in cold if b in same] or cold, key=by)
    default = [r for r in same if schedule(r) == DEFAULT_SCHEDULE]
    return HEADLINE.format(
        machines=machines([best_page, best_cold]), model=best_page["model"], default=DEFAULT_SCHEDULE,
        page_vs=f"{by(best_page):.2f}", page_draft=best_page["draft"], page_quant=best_page["quant"],
        page_prompts=best_page["prompt_kind"], page_tpv=f"{bench.number(best_page['accepted_per_verify']):.1f}",
        cold_vs=f"{by(best_cold):.2f}", cold_draft=best_cold["draft"], cold_quant=best_cold["quant"],
        cold_schedule=schedule(best_cold), slow=sum(by(r) < SLOW for r in default), rows=len(default), bar=SLOW)


def gpu_prediction(results: Path) -> str:
    """The GPU prediction with the code acceptance of the draft that predicts fastest on the 3B
    reference from NVMe (NF4 target: the reference's format)."""
    measured = [a for a in estimate.measured_acceptance(bench.read_rows(results / CSV))
                if a.prompt_kind == "code" and a.quant == "nf4"]
    if not measured:
        return ""
    plain = estimate.speculative_predictions(None)
    scored = [(a, estimate.speculative_predictions(a)) for a in measured]
    best, predicted = max(scored, key=lambda s: (s[1][1].tok_s or 0))
    cells = "; ".join(f"{p.setup}: {p.cell()}" for p in predicted)
    return (f"GPU prediction (`estimate.py --speculative`, RTX 4050, read-ahead), with {best.draft.name}'s acceptance "
            f"on code ({best.accepted_per_verify:.1f} tokens per verify): {cells}; plain stream "
            + ", ".join(p.cell() for p in plain) + " tok/s.")


def notes(results: Path) -> list[str]:
    """Over every row: which drafts fall below 0.9x plain at the default schedule, beside the
    range when every verify asks the draft; then the exactness."""
    found = rows(results)
    out = []
    default = [r for r in found if schedule(r) == DEFAULT_SCHEDULE]
    if default:
        slow = [r for r in default if bench.number(r["vs_plain"]) < SLOW]
        out.append(f"At the default ({DEFAULT_SCHEDULE}) schedule, " + (
            f"{len(slow)} of {len(default)} rows run below {SLOW}x plain: " + ", ".join(
                f"{r['draft']} ({r['quant']}, {reads(r)}, {r['prompt_kind']}: {bench.number(r['vs_plain']):.2f}x)"
                for r in slow) if slow else f"no row runs below {SLOW}x plain ({len(default)} rows)") + "; asked at "
            "every verify (constant), the same drafts range from " + _range(
                [r for r in found if schedule(r) == "constant" and reads(r) == "page cache"]) + " from the page cache.")
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


def _range(found: list[dict]) -> str:
    ratios = [bench.number(r["vs_plain"]) for r in found]
    return f"{min(ratios):.2f}x to {max(ratios):.2f}x" if ratios else "(not measured)"


def plot(results: Path) -> list[Path]:
    found = rows(results)
    if not found:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key in dict.fromkeys((r["quant"], reads(r), r["prompt_kind"], schedule(r)) for r in found):
        group = sorted((r for r in found if (r["quant"], reads(r), r["prompt_kind"], schedule(r)) == key),
                       key=lambda r: bench.number(r["draft_bytes"]))
        x = [bench.number(r["draft_bytes"]) / 1e6 for r in group]
        label, style = " / ".join(key), "o-" if key[-1] == DEFAULT_SCHEDULE else "s--"
        speed_ax.plot(x, [bench.number(r["vs_plain"]) for r in group], style, label=label)
        bytes_ax.plot(x, [bench.number(r["read_bytes_per_token"]) / bench.number(r["plain_read_bytes_per_token"])
                          for r in group], style, label=label)
        for r, xi in zip(group, x):
            speed_ax.annotate(r["draft"].replace("qwen2.5-coder-", ""), (xi, bench.number(r["vs_plain"])), fontsize=6)
    speed_ax.axhline(1, color="gray", ls=":")
    speed_ax.set_xlabel("draft's resident MB")
    speed_ax.set_ylabel("decode tok/s vs plain stream decoding")
    bytes_ax.set_xlabel("draft's resident MB")
    bytes_ax.set_ylabel("streamed bytes per token vs plain")
    speed_ax.legend(fontsize=7)
    fig.suptitle(f"Speculative decoding over stream residency: {found[0]['model']} "
                 "(target quant / reads / prompts / schedule)")
    return [save_figure(fig, results / "speculative.png")]
