"""The few human lines a script prints for its row (``summary``): memory against the row's own
same-run baseline, perplexity against a comparable baseline row (``latest_baseline``)."""
from __future__ import annotations

from pathlib import Path

from .csvio import cell, number, read_rows
from .schema import Result


# A baseline row's perplexity is comparable when these match: the same model and weights,
# computed by the same kernels (NF4 on CPU differs between CPUs and library versions).
_SAME_COMPUTATION = ("model", "quant", "quant_head", "device", "device_name", "cpu_isa", "torch", "transformers", "bitsandbytes")


def latest_baseline(path: Path, row: Result) -> dict | None:
    """The last baseline row whose perplexity is comparable with `row`'s: same model, weight
    format, device, machine kind and library versions. Speed and memory are never compared
    across rows (each variant row carries its own same-run baseline)."""
    matches = [r for r in read_rows(path)
               if r.get("variant") == "baseline" and all(r.get(k) == cell(getattr(row, k)) for k in _SAME_COMPUTATION)]
    return matches[-1] if matches else None


def _mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.1f} MB"


def summary(row: Result, baseline: dict | None = None) -> str:
    """A few human lines: the row's numbers; memory as % and speed as a ratio of the row's own
    same-run baseline; perplexity against a comparable `baseline` row (latest_baseline) if it
    scored the same tokens."""
    lines = [f"{row.variant}: {config_text(row)}", *memory_lines(row), *quality_and_speed_lines(row, baseline)]
    return "\n".join(lines)


def config_text(row: Result) -> str:
    """What ran, in words: model, format, machine, the patch and how its layers come in."""
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
        budget = f"device budget {_mb(row.device_budget_bytes)} (planned)" if row.plan else \
            f"budget {_mb(row.budget_bytes)}"
        config += f"; stream prefetch {row.prefetch}, {budget}, reads {bandwidth}"
    if row.batch_size and row.batch_size > 1:
        config += f"; batch {row.batch_size}"
    if row.kv_cache is False:  # None: nothing decoded
        config += "; no KV cache"
    return config


def _versus(value, base, what: str | None = None) -> str:
    # `what` names the unpatched model's figure the bytes are compared with; speeds compare like with like
    if value is None or not base:
        return ""
    if what is not None:
        return f"  ({100 * value / base:.1f}% of the unpatched model's {what}, {_mb(base)})"
    return f"  ({value / base:.3f}x the unpatched model's {_tok_s(base)} tok/s, same run)"


def memory_lines(row: Result) -> list[str]:
    """Device weight bytes and host RSS, against the unpatched model's in the same run; their parts."""
    lines = []
    for label, value, base, what in (
            ("standby weights", row.standby_bytes, row.baseline_standby_bytes, "standby weights"),
            ("peak weights", row.peak_bytes, row.baseline_standby_bytes, "standby weights"),
            ("load peak", row.load_peak_bytes, row.baseline_standby_bytes,
             "standby weights" + (" (this load held the head before quantising it)" if row.quant_head not in
                                  (None, "none") else "")),
            ("idle RSS", row.rss_bytes, row.baseline_rss_bytes, "idle RSS")):
        if value is not None:
            lines.append(f"  {label:<15} {_mb(value):>10}" + _versus(value, base, what))
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
    return lines


def quality_and_speed_lines(row: Result, baseline: dict | None) -> list[str]:
    """Perplexity (against `baseline` when it scored the same tokens), speeds against the same
    run's unpatched model, the layer traffic, and a warning when the machine was busy."""
    lines = []
    if row.ppl is not None:
        same_tokens = baseline is not None and row.variant != "baseline" and all(
            baseline.get(k) == cell(getattr(row, k)) for k in ("ppl_dataset", "ppl_ctx", "ppl_stride", "ppl_tokens"))
        base_ppl = number(baseline.get("ppl")) if same_tokens else None
        lines.append(f"  {'perplexity':<15} {row.ppl:>10.4g}  on {row.ppl_dataset}, {row.ppl_tokens} tokens, "
                     f"ctx {row.ppl_ctx}, stride {row.ppl_stride}"
                     + (f"  (baseline row on this kind of machine: {base_ppl:.4g})" if base_ppl else ""))
    if row.decode_tok_s is not None:
        lines.append(f"  {'decode':<15} {_tok_s(row.decode_tok_s):>6} tok/s"
                     + _versus(row.decode_tok_s, row.baseline_decode_tok_s) + f"; prefill {row.prefill_s:.3f} s")
    if row.plan and row.decode_tok_s is not None:
        held = row.peak_bytes is not None and row.peak_bytes <= row.predicted_peak_bytes
        lines.append(f"  {'plan':<15} predicted {_tok_s(row.predicted_decode_tok_s)} tok/s, measured "
                     f"{_tok_s(row.decode_tok_s)}; peak weights {_mb(row.peak_bytes)}, planned "
                     f"{_mb(row.predicted_peak_bytes)} ({'held' if held else 'EXCEEDED'}; with the KV cache's "
                     f"reserve within the device budget of {_mb(row.device_budget_bytes)})")
    if row.paired_ratio_median is not None:
        lines.append(f"  {'paired':<15} {row.paired_ratio_median:.3f}x the unpatched model's speed, median of the "
                     f"back-to-back pairs (quartiles {row.paired_ratio_q1:.3f}-{row.paired_ratio_q3:.3f})")
    if row.generate_tok_s is not None:
        lines.append(f"  {'generate':<15} {_tok_s(row.generate_tok_s):>6} tok/s"
                     + _versus(row.generate_tok_s, row.baseline_generate_tok_s))
    if row.loads:
        lines.append(f"  per run: {row.loads:g} layer loads, {_mb(row.loaded_bytes)}, {row.per_layer_load_ms:.2f} ms "
                     f"each; waited {row.wait_s:.3f} s of {row.forward_s:.3f} s forward, overlap {row.overlap:.2f}")
    if row.busy:
        lines.append(f"  BUSY: other processes used {100 * row.other_cpu_share:.0f}% of the CPU while timing; "
                     "the speed figures are not trusted (README tables leave this row out)")
    return lines


def _tok_s(value: float) -> str:
    # three significant digits: 0.934, 4.49, 30.6, 410 (one decimal would print 0.9 for 0.934)
    return f"{value:#.3g}".rstrip(".") if value < 1000 else f"{value:.0f}"
