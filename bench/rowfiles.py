"""One row file per sweep case, and folding them into the suite's CSV.

A sweep case writes its rows alone into ``<out>.d/<case-id>.csv`` (results/alpha.d/<id>.csv for
results/alpha.csv) through ``--row-file``: a new file under a temporary name, renamed when whole.
So a case that is killed leaves no row, and no two cases ever write to one file: not two
processes on one machine, nor two nodes of a cluster on a network filesystem, where neither
O_APPEND nor flock holds between clients. merge_row_files folds them into the CSV, once, from
one process.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import offload_skip

from .base import UsageError
from .csvio import append_rows, csv_header, csv_line, csv_lock, read_rows, row_line, save_elsewhere


def row_dir(out: Path) -> Path:
    """Where the row files of the cases that append to `out` go: results/alpha.csv -> results/alpha.d."""
    out = Path(out)
    return out.with_name(out.stem + ".d")


def row_files(out: Path) -> list[Path]:
    """The whole row files waiting in row_dir(out), by name (temporary names start with a dot)."""
    folder = row_dir(out)
    return sorted(p for p in folder.glob("*.csv") if not p.name.startswith(".")) if folder.is_dir() else []


def _write_atomically(path: Path, text: str) -> None:
    offload_skip.atomic_write(path, [text.encode("utf-8")])


def write_row_file(path: Path, rows: list) -> Path:
    """`rows` (frozen dataclasses of one type) alone in a new CSV at `path`, header first;
    written whole or not at all (temp file, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in dataclasses.fields(rows[0])]
    _write_atomically(path, csv_line(fields) + "".join(row_line(row) for row in rows))
    return path


def save_rows(out: Path, rows: list, row_file: Path | None = None) -> Path:
    """Where a script's rows go: appended to `out`, or, for a sweep case (--row-file), into a
    row file of their own that `sweep.py --merge` folds into `out` later. Either way a failed
    write saves the rows elsewhere and says where (UsageError). Returns the file written."""
    if row_file is None:
        return append_rows(out, rows)
    try:
        return write_row_file(row_file, rows)
    except OSError as err:
        save_elsewhere(row_file, rows, err)


def _key(header: list[str], cells: list[str]):
    """What makes two rows the same measurement: its command, or, without one, every cell."""
    command = dict(zip(header, cells)).get("command")
    return command if command else tuple(cells)


def merge_row_files(out: Path, files: list[Path]) -> int:
    """Fold `files` (row files, in this order) into the CSV `out` and remove them; the number of
    rows added. A row whose command is in `out` already, or came in an earlier file, is left
    out: merging again adds nothing and leaves the same bytes. Atomic (the new CSV is written
    beside it, then renamed over it) and under csv_lock. Refused with nothing changed
    (UsageError naming the file): another header than `out`'s, or a row of another width."""
    out, files = Path(out), [Path(f) for f in files]
    if not files:
        return 0
    with csv_lock(out):
        header = csv_header(out)
        seen = {_key(header, list(row.values())) for row in read_rows(out)} if header else set()
        lines = []
        for path in files:
            with path.open(newline="", encoding="utf-8") as f:
                table = list(csv.reader(f))
            if not table:
                raise UsageError(f"{path} is empty: not a row file; move it away and merge again")
            header = header or table[0]
            if table[0] != header:
                raise UsageError(f"{path} has other columns than {out}; nothing merged (move it away, or write "
                                 "the suite to another --results)")
            for line, cells in enumerate(table[1:], start=2):
                if len(cells) != len(header):
                    raise UsageError(f"{path}: line {line} has {len(cells)} cells, the header {len(header)}; "
                                     "nothing merged")
                key = _key(header, cells)
                if key not in seen:
                    seen.add(key)
                    lines.append(csv_line(cells))
        if lines:
            if csv_header(out):
                with out.open(newline="", encoding="utf-8") as f:
                    before = f.read()
            else:
                before = csv_line(header)
            _write_atomically(out, before + "".join(lines))
        for path in files:
            path.unlink(missing_ok=True)
    try:
        row_dir(out).rmdir()  # only when empty
    except OSError:
        pass
    return len(lines)
