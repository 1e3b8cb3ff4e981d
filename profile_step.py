"""Where a decode step's time goes, resident against a variant, op by op (torch.profiler):
what a variant adds, and what grows with the batch.

The unpatched model (ctl.unpatched()) and the variant decode the same left-padded batch,
alternately, under the profiler; each op's self CPU time is summed over the profiled
decodes and divided by the decode steps. Rows go to results/profile.csv, one per
(mode, op), the ops that take the most time first.

    python profile_step.py --batch-size 16 --prefetch 0      # stream vs resident, SmolLM2 NF4
"""
from __future__ import annotations

from pathlib import Path

from torch.profiler import ProfilerActivity, profile

import bench

TOP_OPS = 25


@bench.csv_row
class ProfileRow:
    """One op's self time per decode step, in one mode of one profiling run."""
    mode: str              # resident, or the variant's residency (session, stream)
    model: str
    quant: str
    device_name: str
    batch_size: int
    prefetch: int | None
    op: str
    self_ms_per_step: float
    calls_per_step: float
    step_ms: float         # all ops' self time per step in this mode
    steps: int
    run_id: str
    command: str


def self_times(run_, context, steps: int) -> dict[str, tuple[float, int]]:
    """{op: (self CPU microseconds, calls)} over `steps` profiled decode steps (KV cache on)."""
    totals: dict[str, list] = {}
    decodes = max(1, steps // (run_.args.max_new_tokens - 1))
    for _ in range(decodes):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            bench.decode(run_.model, run_.input_ids, run_.args.max_new_tokens, context=context,
                         attention_mask=run_.attention_mask)
        for event in prof.key_averages():
            total = totals.setdefault(event.key, [0.0, 0])
            total[0] += event.self_cpu_time_total
            total[1] += event.count
    return {key: (us, calls) for key, (us, calls) in totals.items()}


def run(args) -> list[ProfileRow]:
    run_ = bench.open_run(args)
    ctl = bench.patch(run_)
    if ctl is None:
        raise bench.UsageError("profile a variant against the resident model: --variant kvcache or diskoffload")
    n = args.max_new_tokens
    bench.decode(run_.model, run_.input_ids, n, context=ctl.unpatched, attention_mask=run_.attention_mask)  # warm-up
    bench.decode(run_.model, run_.input_ids, n, context=bench.inference(ctl), attention_mask=run_.attention_mask)
    steps = args.repeats * (n - 1)
    # alternate, so both modes see the same machine state
    measured = {"resident": {}, ctl.mode: {}}
    for _ in range(args.repeats):
        for mode, context in (("resident", ctl.unpatched), (ctl.mode, bench.inference(ctl))):
            for key, (us, calls) in self_times(run_, context, n - 1).items():
                total = measured[mode].setdefault(key, [0.0, 0])
                total[0] += us
                total[1] += calls
    rows = []
    env = bench.environment()
    for mode, ops in measured.items():
        step_ms = sum(us for us, _ in ops.values()) / 1e3 / steps
        for key, (us, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:TOP_OPS]:
            rows.append(ProfileRow(mode, run_.info["model"], run_.info["quant"], bench.device_name(run_.device),
                                   run_.input_ids.shape[0], ctl.prefetch if ctl.mode == "stream" else None, key,
                                   us / 1e3 / steps, calls / steps, step_ms, steps, run_.run_id, args.command, **env))
    _print(measured, steps)
    bench.append_rows(args.out, rows)
    print(f"  {len(rows)} rows appended to {args.out}")
    return rows


def _print(measured: dict, steps: int) -> None:
    (a, ops_a), (b, ops_b) = measured.items()
    keys = set(ops_a) | set(ops_b)
    diff = sorted(keys, key=lambda k: -abs(ops_b.get(k, (0, 0))[0] - ops_a.get(k, (0, 0))[0]))[:12]
    total_a = sum(us for us, _ in ops_a.values()) / 1e3 / steps
    total_b = sum(us for us, _ in ops_b.values()) / 1e3 / steps
    print(f"self CPU ms per step: {a} {total_a:.2f}, {b} {total_b:.2f}; the ops that differ most:")
    for key in diff:
        ms_a, ms_b = (ops.get(key, (0, 0))[0] / 1e3 / steps for ops in (ops_a, ops_b))
        print(f"  {key[:60]:<60} {a} {ms_a:8.3f}  {b} {ms_b:8.3f}  diff {ms_b - ms_a:+8.3f}")


def build_parser():
    parser = bench.build_parser("diskoffload", description=__doc__.split("\n\n")[0], prog=Path(__file__).name)
    parser.set_defaults(ppl_max_tokens=0, repeats=3, max_new_tokens=8, out=bench.RESULTS_DIR / "profile.csv")
    parser.add_argument("--variant", choices=("kvcache", "diskoffload"), default="diskoffload",
                        help="the residency profiled against the resident model")
    parser.set_defaults(script_variant=None)  # the variant is --variant's, not the parser's stream flags'
    return parser


def main(argv: list[str] | None = None) -> int:
    return bench.main(run, build_parser(), argv, finish=lambda args: bench.finish_args(args, ProfileRow))


if __name__ == "__main__":
    raise SystemExit(main())
