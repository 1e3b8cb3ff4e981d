"""bench.rows: a run's Result merged from its sources' columns (run, controller, memory,
perplexity, speed, traffic, environment), each column from exactly one. Fakes stand in for the
run and the measurements: nothing is loaded."""
from types import SimpleNamespace as NS

import pytest
import torch

import bench
from bench import rows

ARGS = NS(quant_head="none", layers="even", alpha=0.5, budget=123, io_bandwidth=600_000_000, cold=True, kv_cache=True,
          max_new_tokens=5, warmup=1, repeats=3, seed=7, command="python run_diskoffload.py")
MEMORY = NS(standby_bytes=100, parts=dict(embedding_bytes=10, head_bytes=20, resident_layers_bytes=30, other_bytes=40),
            rss_bytes=5, rss_anon_bytes=3, rss_file_bytes=2, cuda_allocated_bytes=None, cuda_reserved_bytes=None)
SPEED = NS(stats=dict(loads=4.0, loaded_bytes=400.0, load_s=0.02, wait_s=0.01, forward_s=0.3, overlap=0.5),
           peak_bytes=150, baseline=NS(decode_tok_s=10.0, generate_tok_s=8.0), paired_ratios=(0.5, 0.75, 1.0),
           cpu=NS(load_1m_before=1.0, load_1m_after=1.5, other_cpu_share=0.02, busy=False), peak_rss_anon_bytes=4,
           cuda_max_allocated_bytes=None, cuda_max_reserved_bytes=None, prefill_s=0.1, decode_tok_s=9.0,
           decode_ms_per_tok=222.0, generate_tok_s=None)
PPL = NS(ppl=12.5, dataset="short", ctx=64, stride=64, n_tokens=90, peak_bytes=140)


def _run(variant):
    info = dict(model="m", weights="real", quant="fp32", n_layers=4, load_s=0.5, load_peak_bytes=160,
                tied_embeddings=False)
    return NS(args=ARGS, variant=variant, info=info, device=torch.device("cpu"), layers=[0, 2],
              input_ids=torch.zeros(2, 6, dtype=torch.long), run_id="r1")


def _stream():
    return NS(mode="stream", skipped_layers=[2], inject_distance=1, embedding_residency="resident", cpu_read="map",
              prefetch=2, read_bytes_per_forward=lambda: 77)


def test_each_column_comes_from_exactly_one_source():
    run, ctl = _run("diskoffload"), _stream()
    parts = [rows.run_columns(run, SPEED), rows.controller_columns(run, ctl, 5e8),
             rows.memory_columns(run, MEMORY, 150, SPEED, MEMORY), rows.ppl_columns(PPL), rows.speed_columns(SPEED),
             rows.traffic_columns(SPEED), bench.environment()]
    names = [name for part in parts for name in part]
    assert sorted(names) == sorted(bench.FIELDS) and len(names) == len(set(names))


def test_a_stream_row_takes_each_sources_values():
    row = rows.make_result(_run("diskoffload"), _stream(), MEMORY, SPEED, baseline_memory=MEMORY,
                           cold_read_bytes_s=5e8)
    assert (row.mode, row.layers_offloaded, row.skipped_layers, row.prefetch, row.budget_bytes) == (
        "stream", "0 2", "2", 2, 123)
    assert (row.io_bandwidth, row.cold_reads, row.cold_read_bytes_s, row.read_bytes_per_token) == (
        600_000_000, True, 5e8, 77)
    assert (row.peak_bytes, row.offloaded_buffer_bytes, row.baseline_standby_bytes, row.batch_size) == (150, 50, 100, 2)
    assert (row.decode_ratio, row.generate_ratio, row.paired_ratio_median, row.paired_ratio_q1) == (0.9, None, 0.75, 0.625)
    assert (row.loads, row.per_layer_load_ms, row.ppl, row.load_s) == (4.0, 5.0, None, 0.5)


def test_the_baseline_row_has_no_patch_and_its_standby_bytes_are_its_peak():
    row = rows.make_result(_run("baseline"), None, MEMORY, ppl=PPL)
    assert (row.layers, row.layers_offloaded, row.alpha, row.embedding_residency, row.prefetch) == (
        "", "", None, "resident", None)
    assert (row.peak_bytes, row.offloaded_buffer_bytes, row.kv_cache, row.decode_tok_s, row.loads) == (
        100, 0, None, None, None)
    assert (row.ppl, row.ppl_tokens, row.read_bytes_per_token) == (12.5, 90, None)


@pytest.mark.parametrize("speed, peak", [(SPEED, 150), (None, 140)])
def test_a_patched_peak_comes_from_the_timed_runs_else_the_perplexity_pass(speed, peak):
    assert rows.peak_bytes(_stream(), MEMORY, speed, PPL) == peak
