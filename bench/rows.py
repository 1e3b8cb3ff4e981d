"""A run's row: the Result filled from what open_run loaded and measure measured, appended to
--out and summarised. Kept apart from the schema (bench.schema), so that it needs nothing
from the modules that run and measure."""
from __future__ import annotations

import statistics

from .experiment import Run
from .measure import Memory, Speed
from .rowfiles import save_rows
from .provenance import device_name, environment, process_age_s
from .schema import Result
from .summary import latest_baseline, summary
from .workload import VARIANT_MODES


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def make_result(run: Run, ctl, memory: Memory, speed: Speed | None = None, ppl=None,
                baseline_memory: Memory | None = None, cold_read_bytes_s: float | None = None) -> Result:
    """The row for a run, merged from its sources' columns. ctl: the OffloadController, None for
    the baseline. ppl: an eval_ppl.Perplexity or None. baseline_memory: the unpatched model's,
    measured in this process; the baseline speed comes with `speed` (measure_speed times both)."""
    parts = (run_columns(run, speed), controller_columns(run, ctl, cold_read_bytes_s),
             memory_columns(run, memory, peak_bytes(ctl, memory, speed, ppl), speed, baseline_memory),
             ppl_columns(ppl), speed_columns(speed), traffic_columns(speed), environment())
    columns = {}
    for part in parts:
        twice = columns.keys() & part.keys()
        assert not twice, f"columns {sorted(twice)} come from two sources"  # one would silently win
        columns.update(part)
    return Result(**columns)


def run_columns(run: Run, speed: Speed | None) -> dict:
    """What ran: the model as loaded, the variant, and how it was timed (None: not timed)."""
    args, timed = run.args, speed is not None
    return dict(
        variant=run.variant,
        model=run.info["model"],
        weights=run.info["weights"],
        quant=run.info["quant"],
        quant_head=getattr(args, "quant_head", "none"),
        device=run.device.type,
        device_name=device_name(run.device),
        n_layers=run.info["n_layers"],
        tied_embeddings=run.info.get("tied_embeddings"),
        mode=VARIANT_MODES[run.variant],
        kv_cache=bool(args.kv_cache) if timed else None,
        max_new_tokens=args.max_new_tokens if timed else None,
        batch_size=run.input_ids.shape[0] if timed else None,
        prompt_tokens=run.input_ids.shape[1] if timed else None,
        warmup=args.warmup if timed else None,
        repeats=args.repeats if timed else None,
        seed=args.seed,
        command=getattr(args, "command", ""),
        run_id=run.run_id,
        load_s=run.info["load_s"],
    )


def controller_columns(run: Run, ctl, cold_read_bytes_s: float | None) -> dict:
    """The patch: which layers, how they come in and what a forward reads; empty or None for
    the baseline (ctl None), the stream settings None outside stream residency."""
    args, patched = run.args, ctl is not None
    stream = patched and ctl.mode == "stream"
    return dict(
        layers=args.layers if patched else "",
        layers_offloaded=" ".join(map(str, run.layers)) if patched else "",
        alpha=args.alpha if patched else None,
        skipped_layers=" ".join(map(str, ctl.skipped_layers)) if patched else "",
        inject_distance=ctl.inject_distance if patched else None,
        embedding_residency=ctl.embedding_residency if patched else "resident",
        cpu_read=ctl.cpu_read if patched else None,
        prefetch=ctl.prefetch if stream else None,
        budget_bytes=args.budget if stream else None,
        io_bandwidth=args.io_bandwidth if stream else None,
        cold_reads=bool(args.cold) if stream else None,
        cold_read_bytes_s=cold_read_bytes_s,
        read_bytes_per_token=ctl.read_bytes_per_forward() if patched else None,
        **plan_columns(run.info.get("plan")),
    )


def plan_columns(plan) -> dict:
    """--device-budget: the offload_skip.Plan the run followed (None: no plan)."""
    return dict(device_budget_bytes=plan.device_bytes if plan else None, plan=plan.record() if plan else None,
                predicted_decode_tok_s=plan.predicted_tok_s if plan else None,
                predicted_peak_bytes=plan.chosen.weights_bytes if plan else None)


def peak_bytes(ctl, memory: Memory, speed: Speed | None, ppl) -> int | None:
    """Peak device weight bytes: from the timed runs, or from the perplexity pass when nothing
    was timed (eval_ppl.py); the baseline's are its standby bytes."""
    if ctl is None:
        return memory.standby_bytes  # nothing moves: the resident weights are the peak
    if speed is not None:
        return speed.peak_bytes
    return getattr(ppl, "peak_bytes", None)


def memory_columns(run: Run, memory: Memory, peak: int | None, speed: Speed | None,
                   baseline_memory: Memory | None) -> dict:
    """Device and host bytes: idle (`memory`), at the peak, while loading (run.info), while
    decoding (`speed`), and the unpatched model's in this process (`baseline_memory`)."""
    timed = speed is not None
    return dict(
        standby_bytes=memory.standby_bytes,
        peak_bytes=peak,
        embedding_bytes=memory.parts.get("embedding_bytes"),
        head_bytes=memory.parts.get("head_bytes"),
        resident_layers_bytes=memory.parts.get("resident_layers_bytes"),
        other_bytes=memory.parts.get("other_bytes"),
        offloaded_buffer_bytes=peak - memory.standby_bytes if peak is not None else None,
        load_peak_bytes=run.info.get("load_peak_bytes"),
        load_peak_host_bytes=run.info.get("load_peak_host_bytes"),
        rss_bytes=memory.rss_bytes,
        rss_anon_bytes=memory.rss_anon_bytes,
        rss_file_bytes=memory.rss_file_bytes,
        peak_rss_anon_bytes=speed.peak_rss_anon_bytes if timed else None,
        cuda_allocated_bytes=memory.cuda_allocated_bytes,
        cuda_max_allocated_bytes=speed.cuda_max_allocated_bytes if timed else None,
        cuda_reserved_bytes=memory.cuda_reserved_bytes,
        cuda_max_reserved_bytes=speed.cuda_max_reserved_bytes if timed else None,
        baseline_standby_bytes=getattr(baseline_memory, "standby_bytes", None),
        baseline_rss_bytes=getattr(baseline_memory, "rss_bytes", None),
        baseline_rss_anon_bytes=getattr(baseline_memory, "rss_anon_bytes", None),
    )


def ppl_columns(ppl) -> dict:
    """The perplexity pass's (an eval_ppl.Perplexity), all None without one."""
    return dict(ppl=getattr(ppl, "ppl", None), ppl_dataset=getattr(ppl, "dataset", None),
                ppl_ctx=getattr(ppl, "ctx", None), ppl_stride=getattr(ppl, "stride", None),
                ppl_tokens=getattr(ppl, "n_tokens", None))


def speed_columns(speed: Speed | None) -> dict:
    """The timed runs': speeds, the same-run baseline's and the ratios, the machine's load."""
    timed = speed is not None
    base = speed.baseline if timed else None
    cpu = speed.cpu if timed else None
    return dict(
        prefill_s=speed.prefill_s if timed else None,
        decode_tok_s=speed.decode_tok_s if timed else None,
        decode_ms_per_tok=speed.decode_ms_per_tok if timed else None,
        generate_tok_s=speed.generate_tok_s if timed else None,
        baseline_decode_tok_s=getattr(base, "decode_tok_s", None),
        baseline_generate_tok_s=getattr(base, "generate_tok_s", None),
        decode_ratio=_ratio(speed.decode_tok_s, base.decode_tok_s) if base else None,
        **_quartiles(speed.paired_ratios if timed else ()),
        generate_ratio=_ratio(speed.generate_tok_s, base.generate_tok_s) if base else None,
        load_1m_before=getattr(cpu, "load_1m_before", None),
        load_1m_after=getattr(cpu, "load_1m_after", None),
        other_cpu_share=getattr(cpu, "other_cpu_share", None),
        busy=getattr(cpu, "busy", None),
    )


def traffic_columns(speed: Speed | None) -> dict:
    """The controller's offload traffic over the timed runs, means per run (speed.stats)."""
    stats = speed.stats if speed is not None else {}
    loads = stats.get("loads")
    return dict(
        loads=loads,
        loaded_bytes=stats.get("loaded_bytes"),
        layer_load_s=stats.get("load_s"),
        per_layer_load_ms=1000 * stats["load_s"] / loads if loads else None,
        wait_s=stats.get("wait_s"),
        forward_s=stats.get("forward_s"),
        overlap=stats.get("overlap"),
    )


def _quartiles(ratios: tuple[float, ...]) -> dict:
    """paired_ratio_q1, _median, _q3 (inclusive quartiles: with 3 pairs, the middle ones of each half)."""
    if not ratios:
        return {"paired_ratio_median": None, "paired_ratio_q1": None, "paired_ratio_q3": None}
    if len(ratios) == 1:
        return dict.fromkeys(("paired_ratio_median", "paired_ratio_q1", "paired_ratio_q3"), ratios[0])
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"paired_ratio_median": median, "paired_ratio_q1": q1, "paired_ratio_q3": q3}


def finish(run: Run, row: Result) -> Result:
    """Print the summary (perplexity against a comparable baseline row), then append the row to
    --out, or write it to --row-file (save_rows: a failed write saves the row elsewhere and says where)."""
    print(summary(row, latest_baseline(run.args.baseline_csv, row)))
    print(f"  {saved_line(save_rows(run.args.out, [row], run.args.row_file), run.args)}")
    print(f"  {process_age_s():.0f} s since this process started (imports, any first-run fetch, loading, measuring)")
    return row


def saved_line(path, args) -> str:
    """Where the row went, as the summary's last lines say it."""
    if args.row_file is None:
        return f"row appended to {path}"
    return f"row written to {path} (sweep.py SUITE --merge folds it into {args.out})"
