"""KV-cache variant (the original's main job): the offloaded layers stay on disk while idle
and are all loaded for each inference (session residency), KV cache on.

    python run_kvcache.py                   # embedded SmolLM2-135M NF4, offline, CPU or CUDA
"""
from __future__ import annotations

from pathlib import Path

import bench
import eval_ppl

VARIANT = "kvcache"


def run(args) -> bench.Result:
    run_ = bench.open_run(args)
    # offload_skip.patch_model(mode="session"): every measured inference runs inside
    # ctl.session(), which loads all offloaded layers on entry and drops them on exit.
    ctl = bench.patch(run_)
    unpatched = bench.measure_unpatched(run_, ctl)  # this process's model, unpatched: the row's baseline
    # generate() too: the patched model supports it, and the original timed it this way.
    speed = bench.measure_speed(run_, ctl, generate_too=True)
    ppl = eval_ppl.evaluate(run_, ctl)
    memory = bench.measure_memory(run_, ctl)
    return bench.finish(run_, bench.make_result(run_, ctl, memory, speed, ppl, unpatched))


def main(argv: list[str] | None = None) -> int:
    parser = bench.build_parser(VARIANT, description=__doc__.split("\n\n")[0], prog=Path(__file__).name)
    return bench.main(run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
