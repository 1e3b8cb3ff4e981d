"""The results CSV files: one row per line in one locked write (``append_row``), the header
only in a new file, a file of another schema refused (``check_csv``) or brought to this
version's columns (``migrate_csv``), rows read back as dicts of strings (``read_rows``)."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import tempfile
from pathlib import Path

from .base import UsageError, temp_sibling
from .schema import Result


def cell(value) -> str:
    """A value as its CSV cell: None empty, a float to 6 significant digits."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def csv_header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), None)


def check_csv(path: Path, row_type: type = Result) -> None:
    """A results file must be new, empty, or have exactly the row type's columns: schemas never mix."""
    path = Path(path)
    fields = tuple(f.name for f in dataclasses.fields(row_type))
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give a CSV file path")
    header = csv_header(path)
    if header is not None and tuple(header) != fields:
        extra, missing = sorted(set(header) - set(fields)), sorted(set(fields) - set(header))
        detail = f"extra {extra}, missing {missing}" if extra or missing else "same columns in another order"
        cure = "; or bring it to these columns with bench.migrate_csv" if not extra else ""
        raise UsageError(f"{path} has other columns than this version's {row_type.__name__} ({detail}); "
                         f"move it away or write to another --out{cure}")


def check_writable(path: Path) -> None:
    """UsageError unless a row can be appended to `path`: the file opens for appending, or its
    folder (made now if missing) takes a new file. Tried, not inferred from permission bits,
    which root and read-only filesystems do not follow."""
    path = Path(path)
    try:
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
                pass
    except OSError as err:
        raise UsageError(f"cannot write the rows to {path} ({type(err).__name__}: {err.strerror or err}); "
                         "fix its permissions or pass another --out") from None


def check_output(path: Path, row_type: type = Result) -> None:
    """Before any measuring: `path` takes a row of `row_type` (check_writable, check_csv)."""
    check_writable(path)
    check_csv(path, row_type)


APPENDED: list[Path] = []  # the files this process appended a row to, in order


def append_rows(path: Path, rows: list) -> Path:
    """append_row each of `rows` to `path`. If an append fails (the folder changed during the
    run), the rows not yet appended go elsewhere (save_elsewhere): nothing measured is lost."""
    for k, row in enumerate(rows):
        try:
            append_row(path, row)
        except OSError as err:
            save_elsewhere(path, rows[k:], err)
    return Path(path)


def save_elsewhere(path: Path, rows: list, err: OSError):
    """Rows that could not be written to `path` go to a new CSV of their own in the temp folder,
    and a UsageError names both files."""
    fd, name = tempfile.mkstemp(prefix=f"{Path(path).stem}-unsaved-", suffix=".csv")
    os.close(fd)
    os.unlink(name)  # append_row writes the header into a new file
    for unsaved in rows:
        append_row(Path(name), unsaved)
    raise UsageError(f"could not write to {path} ({type(err).__name__}: {err.strerror or err}); "
                     f"{len(rows)} row(s) saved in {name} instead") from None


@contextlib.contextmanager
def csv_lock(path: Path):
    """An exclusive lock on `path`'s lock file (`<name>.lock` beside it) for the block: appends
    from processes on one machine never interleave, and only the first writes the header. It is
    an advisory fcntl.flock: on NFS it holds between the processes of one client, not between
    nodes (Linux NFS clients emulate flock with byte-range locks, which hold only where the
    server supports them). Without fcntl (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def csv_line(cells) -> str:
    line = io.StringIO()
    csv.writer(line).writerow(cells)
    return line.getvalue()


def row_line(row) -> str:
    """A frozen dataclass row as one CSV line, its cells in field order."""
    return csv_line([cell(getattr(row, f.name)) for f in dataclasses.fields(row)])


def append_row(path: Path, row) -> Path:
    """Append one row (a Result, or another frozen dataclass) in one write() under csv_lock;
    the header, its field names, is written only when the file is new (or empty), as the lock
    holder sees it: rows from many processes at once are whole rows under one header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in dataclasses.fields(row)]
    text = row_line(row)
    with csv_lock(path):
        check_csv(path, type(row))
        if csv_header(path) is None:
            text = csv_line(fields) + text
        data = text.encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write (a signal, a full pipe): the rest, still locked
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)
    APPENDED.append(path)
    return path


def migrate_csv(path: Path, row_type: type = Result) -> bool:
    """Bring a results CSV written by an earlier version to this version's columns: every
    missing column added as empty cells, every value kept under its column, the columns in
    this version's order (so append_row takes the file again). Atomic: the new file is
    written next to it, then os.replace()d over it. Returns False, leaving the file alone, when
    it is empty or has these columns already.

    Refused (UsageError naming the file): a column this version does not know (migrating
    would drop it: a file of another row type, or from a later version), a column named
    twice, or a row with more cells than the header. E.g. for the Result files under results/:
    ``for p in Path("results").glob("*.csv"): bench.migrate_csv(p)`` after setting aside the
    files of other row types (peers, profile, block_influence, exactness)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} is not a file; nothing to migrate")
    fields = [f.name for f in dataclasses.fields(row_type)]
    header = csv_header(path)
    if header is None or header == fields:
        return False
    unknown = [name for name in header if name not in fields]
    if unknown:
        raise UsageError(f"{path}: columns {unknown} are not {row_type.__name__} columns of this version; "
                         "not migrated (that would drop them)")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise UsageError(f"{path}: columns {twice} appear twice; not migrated")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    tmp = temp_sibling(path)
    try:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(fields)
            for line, cells in enumerate(rows, start=2):
                if len(cells) > len(header):
                    raise UsageError(f"{path}: line {line} has {len(cells)} cells, the header {len(header)} "
                                     "columns; not migrated")
                values = dict(zip(header, cells))
                writer.writerow([values.get(name, "") for name in fields])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV as dicts of strings ('' = empty cell); [] if there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def number(value) -> float | None:
    """A CSV cell (or a value) as a float; None when empty or not a number."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
