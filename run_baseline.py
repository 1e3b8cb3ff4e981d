"""Baseline: the unpatched model, every layer resident. Timed through the shared decode loop
and through model.generate, so the variants' ratios compare like with like.

    python run_baseline.py                  # appends a row to results/baseline.csv
"""
from __future__ import annotations

from pathlib import Path

import bench
import eval_ppl

VARIANT = "baseline"


def run(args) -> bench.Result:
    run_ = bench.open_run(args)
    speed = bench.measure_speed(run_, generate_too=True)
    ppl = eval_ppl.evaluate(run_)
    memory = bench.measure_memory(run_)
    return bench.finish(run_, bench.make_result(run_, None, memory, speed, ppl))


def main(argv: list[str] | None = None) -> int:
    parser = bench.build_parser(VARIANT, description=__doc__.split("\n\n")[0], prog=Path(__file__).name)
    return bench.main(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
