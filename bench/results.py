"""The result row: one frozen dataclass per CSV row (config + metrics + environment), its
column documentation, the CSV files, and the summary a script prints. Nothing here knows a
run: bench.rows fills a Result from one."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import importlib.metadata
import io
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import REPO_DIR, UsageError, temp_sibling

# Other work above this share of the machine marks a row busy (README tables leave it out).
# An idle VM here shows ~0.01; a second benchmark or a test run on 2 cores 0.3-0.5.
BUSY_OTHER_CPU_SHARE = 0.10

COLUMNS = {
    # what ran
    "variant": "baseline (unpatched), kvcache (session residency) or diskoffload (stream residency)",
    "model": "--model as given (embedded alias, directory, hub id, or dummy:SHAPE|ALIAS|DIR)",
    "weights": "real, or dummy (seeded random values in the model's shapes and formats: bytes and speed are "
               "the real model's, perplexity and acceptance mean nothing, so none is measured); empty in rows "
               "written before this column, all of them real",
    "quant": "weight format: nf4 (bitsandbytes, double quant, bf16 compute), bf16, fp16, fp32",
    "quant_head": "output head format: none (as loaded; bitsandbytes leaves the head unquantised) or nf4 "
                  "(--quant-head: a 4-bit copy, approximate by design)",
    "device": "compute device (cpu, cuda)",
    "device_name": "CUDA device name, or 'CPU: <model name>'",
    "layers": "--layers pattern (empty for the baseline)",
    "layers_offloaded": "indices of the offloaded decoder layers, space-separated (empty for the baseline)",
    "n_layers": "decoder layers in the model",
    "alpha": "residual weight of the offloaded layers (empty for the baseline); --skip layers have 0",
    "skipped_layers": "offloaded layers removed outright (--skip: alpha 0, never read), space-separated",
    "inject_distance": "an offloaded run's contribution is added before the k-th resident layer after it "
                       "(1: the next one, exact at alpha 1); empty for the baseline",
    "embedding_residency": "input embedding: resident; disk (--offload-embeddings: each forward reads its tokens' "
                           "rows from a file); tied (asked, but kept resident: the output head shares the matrix)",
    "tied_embeddings": "True when the checkpoint's output head shares the input embedding's matrix (before --quant-head)",
    "mode": "residency: resident (baseline), session (loaded for each inference), stream (loaded per layer use)",
    "cpu_read": "patched variants on a CPU, how an offloaded layer came in (--cpu-read): map (its tensors were views "
                "of a private mapping of the layer file: no copy, the pages the page cache's) or copy (read into a "
                "buffer of the layer's size); empty for the baseline and on CUDA (copied through pinned staging). "
                "Rows written before this column (empty after bench.migrate_csv) copied",
    "prefetch": "stream: layers read ahead by the background reader (resolved from auto)",
    "budget_bytes": "stream: bytes of offloaded layers allowed to stay resident",
    "io_bandwidth": "stream: emulated storage bandwidth in bytes/s (empty: unthrottled)",
    "cold_reads": "stream: True when every layer read first dropped the file from the page cache (--cold), "
                  "so its bytes came from the storage device",
    "cold_read_bytes_s": "stream --cold: bytes/s of reading each streamed layer file once, cold, one after "
                         "the other, measured before the timed runs",
    "kv_cache": "True: decode from the KV cache; False: recompute the whole sequence per token; "
                "empty: nothing decoded (eval_ppl.py)",
    "max_new_tokens": "tokens decoded per timed run",
    "batch_size": "sequences decoded together (left-padded prompts of unequal length); tok/s counts all of them",
    "prompt_tokens": "tokens in the prompt",
    "warmup": "untimed runs before the measured ones",
    "repeats": "measured runs (timings are their median)",
    "seed": "--seed",
    "command": "the command line that wrote the row (python <script> <arguments>): rerun it to reproduce",
    "run_id": "unique id of the script invocation that wrote the row; its baseline_* columns come from the "
              "same process",
    # memory
    "standby_bytes": "weight bytes resident on the compute device while idle (parameters, buffers, NF4 quant "
                     "states; each storage once); variants: after standby()",
    "peak_bytes": "most weight bytes resident on the device during the measured runs (controller accounting, "
                  "stream slots included); baseline: = standby_bytes",
    "embedding_bytes": "of standby_bytes: the input embedding (0 when its rows are read from disk; a tied head's "
                       "matrix is counted here)",
    "head_bytes": "of standby_bytes: the output head's own tensors (0 when tied to the embedding)",
    "resident_layers_bytes": "of standby_bytes: the decoder layers kept in the model",
    "other_bytes": "of standby_bytes: everything else (final norm, rotary tables); the four parts sum to standby_bytes",
    "offloaded_buffer_bytes": "peak_bytes - standby_bytes: the offloaded layers' device buffers at the peak "
                              "(0 for the baseline)",
    "load_peak_bytes": "most bytes on the compute device while loading (from_pretrained, then patching): CUDA: "
                       "torch.cuda.max_memory_allocated; CPU: the weights as standby_bytes counts them, after "
                       "from_pretrained and after each offloaded layer was made real. Patched variants load the "
                       "offloaded layers one at a time from the checkpoint (bench/layer_loading.py)",
    "load_peak_host_bytes": "most anonymous resident host memory of the process while loading (load_model: "
                            "from_pretrained, and storing the offloaded layers), sampled every 2 ms from "
                            "/proc/self/statm (resident - shared: the mmap'd checkpoint is not counted); "
                            "measured, not counted (CPU: the weights, torch and Python; Linux only)",
    "rss_bytes": "process resident set size while idle, after malloc_trim (CPU: everything, weights included; "
                 "CUDA: host memory and the CUDA context's host side; the pinned staging is released when idle, "
                 "so it shows in neither this nor baseline_rss_bytes)",
    "rss_anon_bytes": "of rss_bytes: anonymous pages (/proc/self/status RssAnon, read just after it): what the "
                      "process allocated, weights and layer buffers included; Linux only",
    "rss_file_bytes": "of rss_bytes: file-backed pages (RssFile): shared libraries and any file still mapped (idle, "
                      "the layer files are unmapped); clean pages the kernel may drop and read again; Linux only. "
                      "rss_bytes is about these two plus shared memory (RssShmem)",
    "peak_rss_anon_bytes": "the most anonymous resident bytes (RssAnon) of the process while it decodes: sampled "
                           "every 2 ms over one untimed decode after the timed ones (a copied layer's slot shows "
                           "here, a mapped layer's file-backed pages do not); Linux only",
    "cuda_allocated_bytes": "CUDA only: torch.cuda.memory_allocated while idle",
    "cuda_max_allocated_bytes": "CUDA only: torch.cuda.max_memory_allocated over the measured runs "
                                "(weights, activations, KV cache)",
    "cuda_reserved_bytes": "CUDA only: torch.cuda.memory_reserved while idle, after empty_cache",
    "cuda_max_reserved_bytes": "CUDA only: torch.cuda.max_memory_reserved over the measured runs (the allocator's "
                               "cache too: what runs a small card out of memory, with the CUDA context); a "
                               "variant timed beside the unpatched model: over one more untimed run after "
                               "empty_cache, since the timed ones inherit the unpatched run's cache",
    "baseline_standby_bytes": "variants: standby_bytes of the unpatched model, measured in the same process inside "
                              "ctl.unpatched() (every offloaded layer read back and in place; rows before the "
                              "streamed load: before patching)",
    "baseline_rss_bytes": "variants: rss_bytes of the unpatched model, same process, measured likewise",
    "baseline_rss_anon_bytes": "variants: rss_anon_bytes of the unpatched model, same process, measured likewise "
                               "(its offloaded layers read into buffers of their own, whatever cpu_read says)",
    "read_bytes_per_token": "bytes of layer files one forward reads in stream residency: the offloaded layers "
                            "not skipped and not kept by --budget (session: the same layers, read once per "
                            "inference); what decode time follows on a GPU; empty for the baseline",
    # quality
    "ppl": "perplexity exp(mean NLL over scored tokens); empty with --ppl-max-tokens 0",
    "ppl_dataset": "corpus: wiki-embedded, wikitext2, short (texts scored one by one) or a file path",
    "ppl_ctx": "tokens per perplexity window",
    "ppl_stride": "tokens the window moves by (= ctx: non-overlapping)",
    "ppl_tokens": "tokens scored (predicted) in total",
    # speed
    "prefill_s": "median seconds from the start of an inference to its first new token (a session's layer "
                 "loads included)",
    "decode_tok_s": "median batch_size * (max_new_tokens - 1) / seconds from the first to the last new token, "
                    "greedy, through the shared decode loop",
    "decode_ms_per_tok": "milliseconds per decode step (one token of every sequence): "
                         "1000 * batch_size / decode_tok_s",
    "generate_tok_s": "batch_size * max_new_tokens / median wall seconds of model.generate (greedy, KV cache); "
                      "baseline and kvcache only",
    "baseline_decode_tok_s": "variants: decode_tok_s of the unpatched model (KV cache on), its repeats "
                             "interleaved with the variant's in the same process",
    "baseline_generate_tok_s": "variants: generate_tok_s of the unpatched model, interleaved likewise",
    "decode_ratio": "decode_tok_s / baseline_decode_tok_s: the same-run speed ratio",
    "paired_ratio_median": "median over the repeats of each pair's ratio (the unpatched decode's seconds over the "
                           "variant's, timed back to back): steadier than decode_ratio against a machine's drift",
    "paired_ratio_q1": "first quartile of those per-pair ratios: with paired_ratio_q3, their spread",
    "paired_ratio_q3": "third quartile of those per-pair ratios",
    "generate_ratio": "generate_tok_s / baseline_generate_tok_s",
    "load_1m_before": "1-minute load average when the timed runs began (this process's threads included)",
    "load_1m_after": "1-minute load average when they ended",
    "other_cpu_share": "share of all cores' time used by other processes (and hypervisor steal) during the "
                       "timed runs, from /proc/stat minus this process's CPU time",
    "busy": f"True when other_cpu_share > {BUSY_OTHER_CPU_SHARE}: other work shared the CPU, so the speed "
            "figures are not trusted (README tables leave the row out)",
    "load_s": "seconds of the model's from_pretrained (excluding a one-off GGUF conversion)",
    # offload traffic, means per measured run (sum over the repeats / repeats)
    "loads": "offloaded layer reads per run",
    "loaded_bytes": "bytes of offloaded layers read per run",
    "layer_load_s": "reader busy seconds per run (controller stats load_s; reader thread included)",
    "per_layer_load_ms": "layer_load_s / loads, in milliseconds",
    "wait_s": "seconds per run compute was stalled waiting for a layer",
    "forward_s": "seconds per run inside the model's forward calls",
    "overlap": "share of min(read time, compute time) hidden by prefetch (mean of the runs' values)",
    # environment
    "torch": "torch version",
    "transformers": "transformers version",
    "bitsandbytes": "bitsandbytes version (empty if not installed)",
    "python": "Python version",
    "torch_threads": "torch.get_num_threads()",
    "machine": "host name and CPU model",
    "cpu_isa": "widest CPU vector extension that matters here: avx512_bf16 (bitsandbytes' fused NF4 kernel), "
               "avx512f, avx2 or other; NF4 results differ between them",
    "commit": "git rev-parse --short HEAD, '-dirty' if tracked .py files have uncommitted changes",
    "timestamp": "UTC time the row was written (ISO 8601)",
}


# The environment columns every row type ends with (values: environment()).
ENVIRONMENT_FIELDS = {"torch": str, "transformers": str, "bitsandbytes": str, "python": str, "torch_threads": int,
                      "machine": str, "cpu_isa": str, "commit": str, "timestamp": str}


def csv_row(cls):
    """A frozen dataclass for one CSV row: the class's own fields, then the environment columns."""
    cls.__annotations__ = {**cls.__dict__.get("__annotations__", {}),
                           **{name: kind.__name__ for name, kind in ENVIRONMENT_FIELDS.items()}}
    return dataclass(frozen=True)(cls)


@csv_row
class Result:
    """One CSV row; the columns are these fields in this order (meanings in COLUMNS).
    None is an empty cell: a column that does not apply to this run."""
    variant: str
    model: str
    weights: str | None
    quant: str
    quant_head: str
    device: str
    device_name: str
    layers: str
    layers_offloaded: str
    n_layers: int
    alpha: float | None
    skipped_layers: str
    inject_distance: int | None
    embedding_residency: str
    tied_embeddings: bool | None
    mode: str
    cpu_read: str | None
    prefetch: int | None
    budget_bytes: int | None
    io_bandwidth: int | None
    cold_reads: bool | None
    cold_read_bytes_s: float | None
    kv_cache: bool | None
    max_new_tokens: int | None
    batch_size: int | None
    prompt_tokens: int | None
    warmup: int | None
    repeats: int | None
    seed: int
    command: str
    run_id: str
    standby_bytes: int
    peak_bytes: int | None
    embedding_bytes: int | None
    head_bytes: int | None
    resident_layers_bytes: int | None
    other_bytes: int | None
    offloaded_buffer_bytes: int | None
    load_peak_bytes: int | None
    load_peak_host_bytes: int | None
    rss_bytes: int | None
    rss_anon_bytes: int | None
    rss_file_bytes: int | None
    peak_rss_anon_bytes: int | None
    cuda_allocated_bytes: int | None
    cuda_max_allocated_bytes: int | None
    cuda_reserved_bytes: int | None
    cuda_max_reserved_bytes: int | None
    baseline_standby_bytes: int | None
    baseline_rss_bytes: int | None
    baseline_rss_anon_bytes: int | None
    read_bytes_per_token: int | None
    ppl: float | None
    ppl_dataset: str | None
    ppl_ctx: int | None
    ppl_stride: int | None
    ppl_tokens: int | None
    prefill_s: float | None
    decode_tok_s: float | None
    decode_ms_per_tok: float | None
    generate_tok_s: float | None
    baseline_decode_tok_s: float | None
    baseline_generate_tok_s: float | None
    decode_ratio: float | None
    paired_ratio_median: float | None
    paired_ratio_q1: float | None
    paired_ratio_q3: float | None
    generate_ratio: float | None
    load_1m_before: float | None
    load_1m_after: float | None
    other_cpu_share: float | None
    busy: bool | None
    load_s: float
    loads: float | None
    loaded_bytes: float | None
    layer_load_s: float | None
    per_layer_load_ms: float | None
    wait_s: float | None
    forward_s: float | None
    overlap: float | None


FIELDS = tuple(f.name for f in dataclasses.fields(Result))
assert set(FIELDS) == set(COLUMNS), "every Result field is documented in COLUMNS, and only those"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}"


def git_commit(repo: Path = REPO_DIR) -> str:
    """Short HEAD, plus -dirty when tracked .py files differ from it; '' outside a git checkout."""
    def git(*argv):
        return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return ""
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty else "")


def cpu_isa() -> str:
    """avx512_bf16, avx512f, avx2 or other: what decides bitsandbytes' NF4 CPU path here."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    for isa in ("avx512_bf16", "avx512f", "avx2"):
        if isa in flags:
            return isa
    return "other"


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.node()} ({cpu_name()})",
        "cpu_isa": cpu_isa(),
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cell(value) -> str:
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
    return csv_line([_cell(getattr(row, f.name)) for f in dataclasses.fields(row)])


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


# A baseline row's perplexity is comparable when these match: the same model and weights,
# computed by the same kernels (NF4 on CPU differs between CPUs and library versions).
_SAME_COMPUTATION = ("model", "quant", "quant_head", "device", "device_name", "cpu_isa", "torch", "transformers", "bitsandbytes")


def latest_baseline(path: Path, row: Result) -> dict | None:
    """The last baseline row whose perplexity is comparable with `row`'s: same model, weight
    format, device, machine kind and library versions. Speed and memory are never compared
    across rows (each variant row carries its own same-run baseline)."""
    matches = [r for r in read_rows(path)
               if r.get("variant") == "baseline" and all(r.get(k) == _cell(getattr(row, k)) for k in _SAME_COMPUTATION)]
    return matches[-1] if matches else None


def _mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.1f} MB"


def summary(row: Result, baseline: dict | None = None) -> str:
    """A few human lines: the row's numbers; memory as % and speed as a ratio of the row's own
    same-run baseline; perplexity against a comparable `baseline` row (latest_baseline) if it
    scored the same tokens."""
    machine = row.device_name.removeprefix("CPU: ") if row.device_name else ""
    if row.device == "cpu" and row.cpu_isa:
        machine += f", {row.cpu_isa}"  # which NF4 path bitsandbytes took, and so which speeds to expect
    config = f"{row.model} {row.quant} on {row.device}" + (f" ({machine})" if machine else "")
    if row.weights == "dummy":
        config += ", dummy weights (bytes and speed only)"
    if row.layers_offloaded:
        n = len(row.layers_offloaded.split())
        config += f", {n} of {row.n_layers} layers offloaded ({row.layers})"
        config += f", alpha {row.alpha:g}"
        if row.skipped_layers:
            config += f", layers {row.skipped_layers} removed"
        if row.inject_distance and row.inject_distance > 1:
            config += f", injected {row.inject_distance} resident layers later"
    if row.embedding_residency == "disk":
        config += "; input embedding rows read from disk"
    elif row.embedding_residency == "tied":
        config += "; input embedding kept resident (tied to the output head: nothing saved)"
    if row.quant_head not in (None, "none"):
        config += f"; output head in {row.quant_head.upper()} (approximate)"
    if row.cpu_read:
        config += "; layer files mapped, not copied" if row.cpu_read == "map" else "; layers read into buffers"
    if row.mode == "stream":
        bandwidth = "unthrottled" if row.io_bandwidth is None else f"{row.io_bandwidth / 1e6:g} MB/s"
        if row.cold_reads:
            bandwidth += ", cold (page cache dropped)"
            if row.cold_read_bytes_s:
                bandwidth += f", storage read {row.cold_read_bytes_s / 1e6:.0f} MB/s"
        config += f"; stream prefetch {row.prefetch}, budget {_mb(row.budget_bytes)}, reads {bandwidth}"
    if row.batch_size and row.batch_size > 1:
        config += f"; batch {row.batch_size}"
    if row.kv_cache is False:  # None: nothing decoded
        config += "; no KV cache"

    def versus(value, base, what: str | None = None) -> str:
        # `what` names the unpatched model's figure the bytes are compared with; speeds compare like with like
        if value is None or not base:
            return ""
        if what is not None:
            return f"  ({100 * value / base:.1f}% of the unpatched model's {what}, {_mb(base)})"
        return f"  ({value / base:.3f}x the unpatched model's {_tok_s(base)} tok/s, same run)"

    lines = [f"{row.variant}: {config}"]
    for label, value, base, what in (
            ("standby weights", row.standby_bytes, row.baseline_standby_bytes, "standby weights"),
            ("peak weights", row.peak_bytes, row.baseline_standby_bytes, "standby weights"),
            ("load peak", row.load_peak_bytes, row.baseline_standby_bytes,
             "standby weights" + (" (this load held the head before quantising it)" if row.quant_head not in
                                  (None, "none") else "")),
            ("idle RSS", row.rss_bytes, row.baseline_rss_bytes, "idle RSS")):
        if value is not None:
            lines.append(f"  {label:<15} {_mb(value):>10}" + versus(value, base, what))
    if row.rss_anon_bytes is not None:
        lines.append(f"  {'idle RSS parts':<15} anonymous {_mb(row.rss_anon_bytes)}, file-backed "
                     f"{_mb(row.rss_file_bytes)}" + (f"; unpatched model's anonymous {_mb(row.baseline_rss_anon_bytes)}"
                                                     if row.baseline_rss_anon_bytes is not None else "")
                     + (f"; anonymous while decoding (peak) {_mb(row.peak_rss_anon_bytes)}"
                        if row.peak_rss_anon_bytes is not None else ""))
    if row.embedding_bytes is not None:
        lines.append(f"  {'standby parts':<15} embedding {_mb(row.embedding_bytes)}, head {_mb(row.head_bytes)}, "
                     f"resident layers {_mb(row.resident_layers_bytes)}, other {_mb(row.other_bytes)}; "
                     f"offloaded layers at the peak {_mb(row.offloaded_buffer_bytes)}")
    if row.ppl is not None:
        same_tokens = baseline is not None and row.variant != "baseline" and all(
            baseline.get(k) == _cell(getattr(row, k)) for k in ("ppl_dataset", "ppl_ctx", "ppl_stride", "ppl_tokens"))
        base_ppl = number(baseline.get("ppl")) if same_tokens else None
        lines.append(f"  {'perplexity':<15} {row.ppl:>10.4g}  on {row.ppl_dataset}, {row.ppl_tokens} tokens, "
                     f"ctx {row.ppl_ctx}, stride {row.ppl_stride}"
                     + (f"  (baseline row on this kind of machine: {base_ppl:.4g})" if base_ppl else ""))
    if row.decode_tok_s is not None:
        lines.append(f"  {'decode':<15} {_tok_s(row.decode_tok_s):>6} tok/s"
                     + versus(row.decode_tok_s, row.baseline_decode_tok_s) + f"; prefill {row.prefill_s:.3f} s")
    if row.paired_ratio_median is not None:
        lines.append(f"  {'paired':<15} {row.paired_ratio_median:.3f}x the unpatched model's speed, median of the "
                     f"back-to-back pairs (quartiles {row.paired_ratio_q1:.3f}-{row.paired_ratio_q3:.3f})")
    if row.generate_tok_s is not None:
        lines.append(f"  {'generate':<15} {_tok_s(row.generate_tok_s):>6} tok/s"
                     + versus(row.generate_tok_s, row.baseline_generate_tok_s))
    if row.loads:
        lines.append(f"  per run: {row.loads:g} layer loads, {_mb(row.loaded_bytes)}, {row.per_layer_load_ms:.2f} ms "
                     f"each; waited {row.wait_s:.3f} s of {row.forward_s:.3f} s forward, overlap {row.overlap:.2f}")
    if row.busy:
        lines.append(f"  BUSY: other processes used {100 * row.other_cpu_share:.0f}% of the CPU while timing; "
                     "the speed figures are not trusted (README tables leave this row out)")
    return "\n".join(lines)


def _tok_s(value: float) -> str:
    # three significant digits: 0.934, 4.49, 30.6, 410 (one decimal would print 0.9 for 0.934)
    return f"{value:#.3g}".rstrip(".") if value < 1000 else f"{value:.0f}"


def process_age_s() -> float:
    """Wall seconds since this process started: what the user of a script waited."""
    import psutil
    return time.time() - psutil.Process().create_time()
