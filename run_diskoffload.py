"""Disk-offload variant: stream residency. Each offloaded layer is read just before it is
used and released right after, a background reader --prefetch layers ahead; layers that
fit in --budget stay resident. KV cache on by default; --no-kv-cache recomputes the whole
sequence per token like the original's slow variant. --io-bandwidth emulates slower storage;
--cold drops each layer file from the page cache before reading it, so reads hit the device.
--draft decodes speculatively over the same stream (bench/drafting.py: results/speculative.csv).

    python run_diskoffload.py --prefetch 0 --io-bandwidth 600M
    python run_diskoffload.py --cold --prefetch 2
    python run_diskoffload.py --model qwen2.5-coder-1.5b --quant bf16 --draft self --prompts code
"""
from __future__ import annotations

from pathlib import Path

import bench
import eval_ppl

VARIANT = "diskoffload"


def run(args) -> bench.Result | bench.SpeculativeRow:
    run_ = bench.open_run(args)
    # offload_skip.patch_model(mode="stream", prefetch=..., budget_bytes=..., io_bandwidth=...)
    ctl = bench.patch_run(run_)  # --device-budget: the plan's residency (bench.planning)
    if args.draft != "none":
        return bench.run_drafts(run_, ctl)
    unpatched = bench.measure_unpatched(run_, ctl)  # this process's model, unpatched: the row's baseline
    read_rate = bench.cold_read_bytes_s(ctl) if args.cold else None
    # No generate() timing: the decode loop is the comparison path, and generate cannot
    # run without a KV cache.
    speed = bench.measure_speed(run_, ctl)
    ppl = eval_ppl.evaluate(run_, ctl)
    memory = bench.measure_memory(run_, ctl)
    return bench.finish(run_, bench.make_result(run_, ctl, memory, speed, ppl, unpatched, read_rate))


def main(argv: list[str] | None = None) -> int:
    parser = bench.build_parser(VARIANT, description=__doc__.split("\n\n")[0], prog=Path(__file__).name)
    bench.drafting.add_arguments(parser)
    return bench.main(run, parser, argv, finish=finish)


def finish(args):
    """The shared checks, and --draft's: its rows are SpeculativeRows, in results/speculative.csv by default."""
    bench.drafting.check_arguments(args)
    if args.draft == "none":
        return bench.finish_args(args)
    if args.out is None:
        args.out = bench.RESULTS_DIR / "speculative.csv"
    return bench.finish_args(args, bench.SpeculativeRow)


if __name__ == "__main__":
    raise SystemExit(main())
