"""What every block of the report shares: cell formatting, markdown tables, machine kinds,
suite rows, marker blocks in a markdown file, and saving a figure. Imports nothing of the
package, so every other module of it can import this one."""
from __future__ import annotations

import re
from pathlib import Path

import bench


# --------------------------------------------------------------------------- cells

def num(cell, spec: str, unit: str = "") -> str:
    """A CSV cell (or a number) formatted with `spec`; '' when empty, so a blank is never a zero."""
    value = bench.number(cell)
    return "" if value is None else format(value, spec) + unit


def mb(cell) -> str:
    """A CSV byte cell in MB (10^6, one decimal); '' when empty."""
    value = bench.number(cell)
    return "" if value is None else f"{value / 1e6:.1f}"


def percent(cell, base_cell) -> str:
    value, base = bench.number(cell), bench.number(base_cell)
    return "" if value is None or not base else f"{100 * value / base:.1f}%"


def missing(name: str, command: str) -> str:
    """What a block says before its CSV has rows: the command that makes them."""
    return f"No rows in results/{name} yet: run `{command}`."


def markdown_table(headers: list[str], lines: list[list[str]]) -> str:
    def escape(text) -> str:  # a '|' inside a cell would split it
        return str(text).replace("|", "\\|")
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(escape(cell) for cell in cells) + " |" for cells in lines]
    return "\n".join(out)


def column_table(rows: list[dict], columns) -> str:
    """A table from (header, cell function of a row) pairs."""
    return markdown_table([h for h, _ in columns], [[cell(row) for _, cell in columns] for row in rows])


# --------------------------------------------------------------------------- rows

def machine_kind(row: dict) -> str:
    """What a row's speed and NF4 numerics depend on: the device, and on a CPU its widest
    relevant vector extension (bitsandbytes computes NF4 differently with AVX512-BF16)."""
    isa = row.get("cpu_isa") or "unrecorded ISA"
    return row["device_name"] if row.get("device") == "cuda" else f"{row['device_name']} ({isa})"


def by_machine(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(machine_kind(row), []).append(row)
    return groups


def fullest_machine(rows: list[dict], configuration) -> str:
    """The machine kind whose rows cover the most configurations (configuration(row): a
    hashable), the newest among equals: what a one-machine block or plot shows, so that a few
    new rows on another machine do not replace a whole comparison."""
    kinds = {machine_kind(r) for r in rows}
    return max(kinds, key=lambda kind: (len({configuration(r) for r in rows if machine_kind(r) == kind}),
                                        max(r["timestamp"] for r in rows if machine_kind(r) == kind)))


def machines(rows: list[dict]) -> str:
    """The machine kinds of some rows, for a block's source line."""
    return ", ".join(sorted({machine_kind(r) for r in rows}))


def commits(rows: list[dict]) -> str:
    return ", ".join(sorted({r["commit"] for r in rows}))


def suite_rows(results_dir: Path, suite: str) -> list[dict]:
    """The suite's rows, the latest per command (a rerun replaces a case's row)."""
    latest: dict = {}
    for row in bench.read_rows(Path(results_dir) / f"{suite}.csv"):
        latest[row["command"] or id(row)] = row
    return list(latest.values())


def unpatched_row(rows: list[dict], row: dict) -> dict | None:
    """The baseline row (unpatched, full-precision head) of `row`'s model and weight format."""
    return next((r for r in rows if r["variant"] == "baseline" and r["quant_head"] in ("none", "")
                 and r["model"] == row["model"] and r["quant"] == row["quant"]), None)


# --------------------------------------------------------------------------- markdown files

def marker(name: str, end: bool = False) -> str:
    return f"<!-- {name}:{'end' if end else 'start'} -->"


def replace_block(text: str, name: str, block: str) -> str | None:
    """`text` with what is between the <!-- name:start/end --> markers replaced by `block`;
    None if the markers are absent."""
    start_marker, end_marker = marker(name), marker(name, end=True)
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return None
    return text[: start + len(start_marker)] + "\n" + block + "\n" + text[end:]


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def headings(markdown: str) -> list[str]:
    """The text of every ATX heading outside fenced code blocks."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            out.append(line.lstrip("#").strip())
    return out


# --------------------------------------------------------------------------- figures

def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
