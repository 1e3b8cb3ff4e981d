"""bench.measure: the decode loop, same-run pairing with the unpatched model, the busy watch."""
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from conftest import tiny_model

import bench
import offload_skip
from bench.measure import CpuLoad, watch_cpu


# --------------------------------------------------------------------------- decode loop

@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_decode_and_generate_warn_of_nothing(model, caplog):
    """The repo's own calls use transformers' current API: no deprecation, warning or log line."""
    ids = torch.randint(0, 96, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bench.decode(model, ids, 3)
        bench.generate(model, ids, 3)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_decode_matches_generate(model):
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (1, 9))
    with_cache = bench.decode(model, ids, 6, kv_cache=True)
    without_cache = bench.decode(model, ids, 6, kv_cache=False)
    seconds, generated = bench.generate(model, ids, 6)
    assert with_cache.tokens.shape == (1, 6)
    assert torch.equal(with_cache.tokens, generated)
    assert torch.equal(without_cache.tokens, generated)
    assert with_cache.prefill_s >= 0 and with_cache.decode_s >= 0 and seconds >= 0


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("loop, kv_cache", [("decode", True), ("decode", False), ("generate", True)])
def test_every_token_ticks_once_and_the_tokens_stay_the_same(model, loop, kv_cache, batch):
    """Progress inside the timed loops (on_token) is one call per new token and changes nothing else."""
    ids = torch.randint(0, 96, (batch, 7), generator=torch.Generator().manual_seed(5))
    ticks = []
    if loop == "decode":
        plain = bench.decode(model, ids, 6, kv_cache).tokens
        ticked = bench.decode(model, ids, 6, kv_cache, on_token=lambda: ticks.append(1)).tokens
    else:
        plain = bench.generate(model, ids, 6)[1]
        ticked = bench.generate(model, ids, 6, on_token=lambda: ticks.append(1))[1]
    assert len(ticks) == 6 and torch.equal(ticked, plain)


def test_decode_through_a_session_equals_resident(tmp_path):
    model = tiny_model("qwen2")
    ids = torch.randint(0, 96, (1, 7))
    expected = bench.decode(model, ids, 5).tokens
    ctl = offload_skip.patch_model(model, "even", tmp_path, mode="session", progress=False)
    entered = []

    def session():
        entered.append(1)
        return ctl.session()
    assert torch.equal(bench.decode(model, ids, 5, context=session).tokens, expected)
    assert entered == [1]
    assert ctl.resident_bytes() < offload_skip.tensor_bytes(offload_skip.module_tensors(tiny_model("qwen2")))


def _left_padded(batch: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    ids = torch.randint(1, 96, (batch, longest))
    mask = torch.ones_like(ids)
    for row in range(batch):
        pad = row % 4  # rows of unequal length, padded on the left
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("mode, prefetch", [("session", 0), ("stream", 0), ("stream", 2)])
def test_batched_decoding_offloaded_equals_resident(batch, mode, prefetch, tmp_path):
    model = tiny_model("qwen2")
    ids, mask = _left_padded(batch, 9)
    resident = bench.decode(model, ids, 6, attention_mask=mask).tokens
    _, generated = bench.generate(model, ids, 6, attention_mask=mask)
    assert resident.shape == (batch, 6) and torch.equal(resident, generated)  # padding handled as generate() does
    ctl = offload_skip.patch_model(model, "even", tmp_path, mode=mode, prefetch=prefetch, progress=False)
    context = ctl.session if mode == "session" else contextlib.nullcontext
    assert torch.equal(bench.decode(model, ids, 6, context=context, attention_mask=mask).tokens, resident)
    ctl.standby()


def test_a_left_padded_row_decodes_like_the_row_alone():
    model = tiny_model("llama")
    ids, mask = _left_padded(4, 9)
    batched = bench.decode(model, ids, 5, attention_mask=mask).tokens
    for row in range(4):
        alone = ids[row, mask[row].bool()][None]
        assert torch.equal(bench.decode(model, alone, 5).tokens[0], batched[row])


# --------------------------------------------------------------------------- same-run pairing

class _Args:
    max_new_tokens, warmup, repeats, kv_cache, variant = 4, 1, 3, True, "kvcache"


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_measure_speed_interleaves_the_unpatched_model(mode, tmp_path):
    model = tiny_model("qwen2")
    ids = torch.randint(0, 96, (1, 6))
    expected = bench.decode(model, ids, 4).tokens
    ctl = offload_skip.patch_model(model, "even", tmp_path, mode=mode, prefetch=0, cpu_read="copy", progress=False)
    run = bench.Run(_Args(), model, None, {}, [2, 4], [], None, None, ids)
    order = []
    real_unpatched = ctl.unpatched
    ctl.unpatched = lambda release: (order.append(("unpatched", release)), real_unpatched(release))[1]
    ctl.reset_stats = lambda real=ctl.reset_stats: (order.append("variant"), real())[1]
    speed = bench.measure_speed(run, ctl, generate_too=True)
    # a warmup pair, three timed decode pairs (the variant's resets its stats), four generate pairs
    # the unpatched runs keep the allocator's cache: no timed run pays for the other's allocations
    unpatched = ("unpatched", False)
    assert order == [unpatched] + [unpatched, "variant"] * 3 + [unpatched] * 4
    assert torch.equal(speed.tokens, expected) and torch.equal(speed.baseline.tokens, expected)
    assert speed.baseline.decode_tok_s > 0 and speed.baseline.generate_tok_s > 0 and speed.baseline.baseline is None
    # per timed run: two layers once per session, or once per forward (4 of them) when streamed
    # and copied (on a CPU a mapped layer is mapped once per inference: tests/test_cpu_map.py)
    assert speed.stats["loads"] == (2 if mode == "session" else 8) and speed.baseline.stats == {}
    assert isinstance(speed.cpu, CpuLoad)
    assert len(speed.paired_ratios) == 3 and all(r > 0 for r in speed.paired_ratios)
    assert ctl.resident_bytes() < offload_skip.tensor_bytes(offload_skip.module_tensors(tiny_model("qwen2")))


@pytest.mark.parametrize("ratios,expected", [
    ((), (None, None, None)),
    ((0.9,), (0.9, 0.9, 0.9)),
    ((0.8, 1.0, 0.9), (0.85, 0.9, 0.95)),           # inclusive quartiles: midway in each half
    ((1.0, 0.9, 0.95, 2.0, 0.97), (0.95, 0.97, 1.0)),  # one slow resident run moves the median not at all
])
def test_paired_ratio_quartiles(ratios, expected):
    got = bench.rows._quartiles(ratios)
    assert tuple(got[f"paired_ratio_{k}"] for k in ("q1", "median", "q3")) == pytest.approx(expected)


def test_measure_speed_alone_has_no_baseline():
    model = tiny_model("llama")
    run = bench.Run(_Args(), model, None, {}, [], [], None, None, torch.randint(0, 96, (1, 5)))
    speed = bench.measure_speed(run)
    assert speed.baseline is None and speed.decode_tok_s > 0 and speed.cpu.load_1m_before is not None


def test_a_block_too_short_to_tell_is_not_judged():
    with watch_cpu() as cpu:
        pass
    assert cpu[0].other_cpu_share is None and cpu[0].busy is None


# --------------------------------------------------------------------------- busy

@pytest.mark.parametrize("share, busy", [(None, None), (0.0, False), (0.1, False), (0.11, True), (0.9, True)])
def test_busy_threshold(share, busy):
    assert CpuLoad(1.0, 1.0, share).busy is busy


def test_another_process_makes_it_busy():
    """One spinning process per core for the whole block: whatever the core count (watch_cpu
    divides by os.cpu_count()), the machine is all other processes', a share near 1, of which
    more than 0.6 must show (one process would be 1/16 of a 16-core machine, not busy)."""
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    with watch_cpu() as cpu:
        others = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
        assert [p.wait() for p in others] == [0] * len(others)
    assert cpu[0].other_cpu_share > 0.6 and cpu[0].busy


def _readings(*samples):
    """A stand-in for bench.measure._cpu_sample: (wall s, machine busy s, own CPU s) in turn."""
    return iter(samples).__next__


@pytest.mark.parametrize("machine_s, own_s, share", [
    (2.0, 2.0, 0.0),    # our own two threads fill both cores: nobody else ran
    (2.0, 1.0, 0.5),    # one core ours, one someone else's
    (0.5, 0.25, 0.125), # an eighth of the machine: busy
    (0.5, 0.9, 0.0),    # /proc/stat ticks lag our own clock: never negative
])
def test_the_other_share_is_the_machine_less_this_process(monkeypatch, machine_s, own_s, share):
    monkeypatch.setattr(bench.measure, "_cpu_sample", _readings((10.0, 100.0, 5.0), (11.0, 100.0 + machine_s, 5.0 + own_s)))
    monkeypatch.setattr(bench.measure.os, "cpu_count", lambda: 2)
    with watch_cpu() as cpu:
        pass
    assert cpu[0].other_cpu_share == pytest.approx(share)
    assert cpu[0].busy == (share > bench.BUSY_OTHER_CPU_SHARE)


def test_own_cpu_time_counts_every_thread_of_this_process():
    """What the share subtracts: this process's CPU time, a worker thread's included (CPU
    time, not wall time, so a loaded machine only makes the test slower)."""
    def burn(cpu_s):
        end = time.thread_time() + cpu_s
        while time.thread_time() < end:
            pass
    own_before = bench.measure._cpu_sample()[2]
    worker = threading.Thread(target=burn, args=(0.35,))
    worker.start()
    worker.join()
    assert bench.measure._cpu_sample()[2] - own_before >= 0.3  # os.times() ticks: 10 ms


class _Ctl:
    def offloaded_bytes(self):
        return 1_000


@pytest.mark.parametrize("free, cached, fits", [(1_100, 0, True), (1_000, 100, True), (1_099, 0, False),
                                                (0, 0, False)])
def test_the_unpatched_model_runs_on_cuda_only_when_it_fits(monkeypatch, capsys, free, cached, fits):
    """Needs ctl.offloaded_bytes() + 10% free (driver free + allocator cache), else no same-run
    baseline: a model larger than the device would run out of memory in ctl.unpatched()."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 500 + cached)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 500)
    monkeypatch.setattr(bench.Run, "device", torch.device("cuda"))
    run = bench.Run(_Args(), None, None, {}, [2], [], None, None, None)
    assert bench.measure.unpatched_fits(run, _Ctl()) is fits
    assert ("does not fit on cuda (0 MB needed" in capsys.readouterr().out) is not fits
    if not fits:
        assert bench.measure_unpatched(run, _Ctl()) is None
        assert capsys.readouterr().out == ""  # decided and said once a run


def test_on_cpu_the_unpatched_model_always_runs():
    run = bench.Run(_Args(), None, None, {}, [2], [], None, None, torch.zeros(1, 2, dtype=torch.long))
    assert bench.measure.unpatched_fits(run, _Ctl()) and bench.measure.unpatched_fits(run, None)
