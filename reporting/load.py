"""Models larger than the device: the load peak of each variant against the baseline's, from
results/load.csv (``python sweep.py load``), and the 7B and 14B shapes (dummy weights) streamed
within 6 GiB, from results/large.csv, against their same-run bound and estimate.py. Every number
is a row's, or computed from rows."""
from __future__ import annotations

from pathlib import Path

import bench
import estimate
from bench import hostmem
from reporting.tables import commits, machine_kind, machines, markdown_table, mb, missing, num, suite_rows, unpatched_row

SUITE = "load"


def saved_bytes(row: dict, base: dict | None, column: str) -> float | None:
    """How many bytes below the same-model baseline's `column` the row's is (None: no baseline)."""
    if base is None or row is base or not row[column] or not base[column]:
        return None
    return bench.number(base[column]) - bench.number(row[column])


def load_section(results: Path) -> str:
    rows = suite_rows(results, SUITE)
    if not rows:
        return missing(f"{SUITE}.csv", f"python sweep.py {SUITE}")
    lines = []
    for row in rows:
        base = unpatched_row(rows, row)
        # the offloaded layers' bytes as loaded: the baseline row's standby less the variant's (the
        # same-run baseline_standby_bytes also counts the layer files' alignment padding)
        before = base["standby_bytes"] if base is not None else row["baseline_standby_bytes"]
        offloaded = bench.number(before) - bench.number(row["standby_bytes"]) if row["variant"] != "baseline" else None
        saved, host_saved = saved_bytes(row, base, "load_peak_bytes"), saved_bytes(row, base, "load_peak_host_bytes")
        same_ppl = "" if base is None or row is base else ("= baseline" if row["ppl"] == base["ppl"] else "differs")
        lines.append([row["model"], row["quant"], row["variant"], mb(row["load_peak_bytes"]), mb(row["standby_bytes"]),
                      mb(offloaded), mb(saved), "" if saved is None else ("yes" if saved >= offloaded else "no"),
                      mb(row["load_peak_host_bytes"]), mb(host_saved),
                      f"{bench.number(row['ppl']):.4f}" if row["ppl"] else "", same_ppl,
                      f"{bench.number(row['load_s']):.1f}"])
    headers = ["model", "quant", "variant", "load peak MB", "standby MB", "offloaded layers MB",
               "load peak saved MB", "saved >= offloaded", "host load peak MB", "host peak saved MB", "PPL",
               "PPL vs baseline", "load s"]
    return (f"From results/{SUITE}.csv (`python sweep.py {SUITE}`; {machines(rows)}; commit "
            f"{commits(rows)}). *Load peak*: on CPU the weight bytes counted "
            "after from_pretrained and after each offloaded layer was made real (CUDA: the allocator's peak); "
            f"*host load peak*: the process's anonymous resident memory, sampled every "
            f"{hostmem.SAMPLE_INTERVAL_S * 1e3:g} ms while loading: "
            "measured, so it also holds torch, Python and from_pretrained's transient copies (each checkpoint "
            "tensor is read, then cast), which vary with when the allocator hands memory back: compare it over "
            "repeated runs, not one row.\n\n" + markdown_table(headers, lines))


LARGE_COMMAND = ("python run_diskoffload.py --model dummy:qwen2.5-14b --quant nf4 --layers even --offload-embeddings "
                 "--cpu-read copy --prefetch 1 --out results/large.csv")


large_checks = estimate.large_checks_of


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def large_lines(checks: list[estimate.LargeCheck], full: bool) -> tuple[list[str], list[list[str]]]:
    """(headers, lines) of the large rows: what the device holds against 6 GiB, decode speed
    against the bound (and with `full` the a priori prediction, the read rate, the load)."""
    headers = ["model", "machine", "reads", "offloaded", "device GiB: weights + slots + KV", "fits 6 GiB",
               "decode tok/s", "bound tok/s", "vs bound", "unpatched tok/s, same run"]
    if full:
        headers += ["compute ms/token", "read ms/token", "read GB/s", "a priori tok/s (estimate.py)",
                    "measured / a priori", "host load peak / NF4 size"]
    lines = []
    for c in checks:
        r = c.row
        offloaded = f"{len(r['layers_offloaded'].split())}/{r['n_layers']} ({r['layers']})"
        if r["embedding_residency"] == "disk":
            offloaded += ", embedding rows"
        kv_mib = estimate.run_kv_cache_bytes(r) / 2**20
        line = [f"{r['model']} {r['quant']}", machine_kind(r), "cold" if r["cold_reads"] == "True" else "page cache",
                offloaded, f"{_gib(bench.number(r['peak_bytes']))} + KV {kv_mib:.1f} MiB = {_gib(c.device_bytes)}",
                "yes" if c.device_bytes <= estimate.DEVICE_BYTES else "no",
                f"{1 / c.measured_s:.3g}", f"{1 / c.bound_s:.3g}", f"{c.bound_s / c.measured_s:.2f}x",
                num(r["baseline_decode_tok_s"], ".3g")]
        if full:
            a_priori = c.a_priori_s
            host_ratio = bench.number(r["load_peak_host_bytes"]) / bench.number(r["baseline_standby_bytes"])
            line += [f"{c.compute_s * 1e3:.0f}", f"{c.read_s * 1e3:.0f}", f"{estimate.row_read_Bps(r) / 1e9:.2f}",
                     f"{1 / a_priori:.3g}" if a_priori else "-",
                     f"{a_priori / c.measured_s:.2f}x" if a_priori else "-", f"{host_ratio:.2f}x"]
        lines.append(line)
    return headers, lines


LARGE = """\
The 7B and 14B shapes with dummy weights (`--model dummy:qwen2.5-14b`: the published config, seeded
random weights: bytes and speed, never a score), in NF4 with stream residency and as many layers
resident as fit: what the device holds (the weights and stream slots the row counts at its peak,
plus the run's bf16 KV cache; activations, a few MB at batch 1, not counted) against a 6 GB card's
6 GiB. `--cpu-read copy`: a mapped layer's pages belong to the page cache, not to the device.
*Bound*: the slower of the resident model's compute per token (the unpatched model's decode, timed
in the same run) and the streamed bytes per token over the row's read rate (cold: its measured
storage rate; page cache: its measured read time per layer); *vs bound*: measured speed over the
bound's. *A priori*: estimate.py's model with the compute time scaled by weight bytes from the same
machine's dummy 3B NF4 row, the assumption behind its 7B and 14B GPU predictions; *measured / a
priori*: measured speed over predicted. *Host load peak*: the process's anonymous memory while the
model was made, over the whole model's NF4 bytes."""


def making_sentences(rows: list[dict]) -> list[str]:
    """Per unpatched dummy row (run_baseline.py): the host's peak while the whole model was made,
    over its NF4 bytes: made layer by layer in its format, never a full-precision copy."""
    out = []
    for r in rows:
        if r["variant"] != "baseline" or not bench.number(r["load_peak_host_bytes"]):
            continue
        peak, size = bench.number(r["load_peak_host_bytes"]), bench.number(r["standby_bytes"])
        out.append(f"Making {r['model']} {r['quant']} whole ({machine_kind(r)}, `{r['command']}`): host load peak "
                   f"{peak / 1e9:.2f} GB, {peak / size:.2f}x its {size / 1e9:.2f} GB of weights, in "
                   f"{bench.number(r['load_s']):.0f} s.")
    return out


def large_section(results: Path) -> str:
    checks = large_checks(results)
    if not checks:
        return missing(estimate.LARGE_CSV, LARGE_COMMAND)
    headers, lines = large_lines(checks, full=True)
    rows = [c.row for c in checks]
    making = making_sentences(bench.read_rows(results / estimate.LARGE_CSV))
    return (LARGE + f"\n\nFrom results/{estimate.LARGE_CSV} ({machines(rows)}; commit {commits(rows)}).\n\n"
            + markdown_table(headers, lines) + ("\n\n" + "\n".join(f"- {m}" for m in making) if making else ""))


def sections(results_dir: Path) -> dict[str, str]:
    """Block name -> markdown."""
    return {SUITE: load_section(Path(results_dir)), "large": large_section(Path(results_dir))}
