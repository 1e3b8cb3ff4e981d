"""The command line behind `python report.py`: every block from results/*.csv, written into
the markdown files' marker blocks, and the plots."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench
import estimate
from reporting import beyond, load, runs, streaming, study
from reporting.tables import marker, replace_block

USAGE = """Render results/*.csv: markdown tables into README.md (between the named markers) and
PNG plots into results/.

    python report.py                      # README.md, results/*.png
    python report.py --columns            # what each CSV column counts
"""


def blocks(results: Path) -> dict[str, str]:
    """Every block name -> its markdown, from the CSVs in `results`."""
    rows = runs.load_rows(results)
    exactness = [{"device_name": "", "cpu_isa": "", **r} for r in bench.read_rows(results / "exactness.csv")]
    return {
        "results": runs.render(rows, results.name),
        "lead": runs.lead_section(rows),
        "exactness": runs.exactness_section(exactness, results.name),
        "estimate-reference": estimate.reference_table(),
        "estimate-check": estimate.check_table(results),
        **study.sections(results),
        **streaming.sections(results),
        **beyond.sections(results),
        **load.sections(results),
    }


def plots(results: Path) -> list[Path]:
    return (runs.plot(runs.load_rows(results), results) + study.plots(results) + streaming.plots(results)
            + beyond.plots(results))


def fill(path: Path, named: dict[str, str]) -> list[str]:
    """Replace each named marker block present in the file; the names filled (the file is
    written only if its text changed)."""
    if not path.is_file():
        return []
    text = original = path.read_text(encoding="utf-8")
    filled = []
    for name, block in named.items():
        new = replace_block(text, name, block)
        if new is not None:
            text = new
            filled.append(name)
    if text != original:
        path.write_text(text, encoding="utf-8")
    return filled


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="report.py", description=USAGE.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=bench.RESULTS_DIR,
                        help="directory whose *.csv are read; the PNGs are written there too")
    parser.add_argument("--readme", type=Path, default=bench.REPO_DIR / "README.md",
                        help="markdown file whose marker blocks (<!-- name:start --> ... <!-- name:end -->) are replaced")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--columns", action="store_true", help="print what each CSV column counts and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.columns:
        width = max(map(len, bench.COLUMNS))
        for name in bench.FIELDS:
            print(f"{name:<{width}}  {bench.COLUMNS[name]}")
        return 0
    named = blocks(args.results)
    filled = fill(args.readme, named)
    for name in filled:
        print(f"{args.readme}: {name} block updated")
    if "results" not in filled:
        print(named["results"])
        print(f"\n{args.readme} has no {marker('results')} ... {marker('results', end=True)} markers (or does "
              "not exist): table printed above, README untouched", file=sys.stderr)
    if not args.no_plots:
        for path in plots(args.results):
            print(f"wrote {path}")
    return 0
