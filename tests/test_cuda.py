"""The CUDA read path, which only a GPU runs: the pinned staging is made once and reused, the
compute waits for a slot's copy on the device (never on the host), a copy into a slot waits for
the compute still reading it, read-ahead hides reads behind compute, and standby() hands the
device back down to the resident weights, which is also the standby VRAM bench reports.

Every case is marked cuda: `pytest -m cuda` runs them, and without a GPU they are skipped with
the reason conftest.NO_CUDA. A spinning kernel (torch.cuda._sleep) makes the copy stream or the
compute slow where a case needs one to be: the order of events, not a clock, decides them.
"""
import types

import pytest
import torch
from conftest import CUDA, logits, tiny_model

import bench
import offload_skip as osk
from offload_skip import patch_model

pytestmark = CUDA

SLEEP_CYCLES = 100_000_000  # a spinning kernel of ~50 ms at 2 GHz: far longer than any host step here
BLOCK_BYTES = 512  # the CUDA caching allocator's block size: every allocation is rounded up to it
LAYERS = [2, 4, 6]  # none adjacent (alpha = 1 is exact); tiny layers: one staging chunk each


def _model_and_ids(prompt_ids):
    return tiny_model("llama").to("cuda"), prompt_ids.to("cuda")


def allocated_bytes(tensors) -> int:
    """What torch.cuda.memory_allocated() counts for `tensors`: each CUDA storage once, rounded
    up to the allocator's blocks (the tiny model's tensors are all under 1 MiB, in its small
    pool, where a block is the rounded request and nothing more)."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if tensor.device.type != "cuda" or storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += -(-storage.nbytes() // BLOCK_BYTES) * BLOCK_BYTES
    return total


def _allocated_outside(model) -> int:
    """Device bytes allocated now besides the model's tensors: the prompt, the reference logits,
    the cuBLAS workspace the first forward made (kept for the process)."""
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - allocated_bytes(osk.module_tensors(model))


def _spin_before(modules) -> list:
    """A spinning kernel queued on the current stream before each module's forward: slow compute."""
    return [m.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(SLEEP_CYCLES)) for m in modules]


# --------------------------------------------------------------------------- pinned staging

@pytest.mark.parametrize("mode, prefetch", [("session", 0), ("stream", 0), ("stream", 2)])
def test_every_read_goes_through_one_pinned_staging_kept_until_standby(mode, prefetch, tmp_path, prompt_ids,
                                                                       monkeypatch):
    model, ids = _model_and_ids(prompt_ids)
    reference = logits(model, ids)
    ctl = patch_model(model, LAYERS, tmp_path, mode=mode, prefetch=prefetch, progress=False)
    used = []
    read = osk.Staging.read
    monkeypatch.setattr(osk.Staging, "read", lambda self, *args: (used.append(self), read(self, *args))[1])
    assert ctl.staging_bytes() == 0  # made by the first read
    assert torch.equal(logits(model, ids), reference)
    staging = ctl.reader.staging
    buffers = [(b.data_ptr(), b.nbytes) for b in staging.buffers]
    assert all(b.is_pinned() for b in staging.buffers)
    assert ctl.staging_bytes() == 2 * osk.staging_chunk_bytes(ctl.layer_bytes)
    ctl.standby(release=False)  # between timed runs: the layers go, the staging stays
    assert torch.equal(logits(model, ids), reference)
    ctl.standby(release=False)  # no read ahead still in flight
    assert ctl.reader.staging is staging and [(b.data_ptr(), b.nbytes) for b in staging.buffers] == buffers
    assert len(used) == ctl.stats()["loads"] and {id(s) for s in used} == {id(staging)}
    ctl.standby()
    assert ctl.staging_bytes() == 0


# --------------------------------------------------------------------------- events

def test_the_compute_waits_for_a_slots_copy_on_the_device_not_the_host(tmp_path, prompt_ids, monkeypatch):
    """Each layer's copy queued behind a spinning kernel on the copy stream: acquire() returns
    while the slot's copy event is still pending (no host wait), and the logits are exact, so
    the compute stream waited for that event before it read the slot. Three layers through two
    staging chunks: the third read refills the first chunk only after its copy left it."""
    model, ids = _model_and_ids(prompt_ids)
    reference = logits(model, ids)
    ctl = patch_model(model, LAYERS, tmp_path, mode="stream", prefetch=0, progress=False)
    read_layer = osk.read_layer

    def slow_copy(store, i, flat, staging, io_bandwidth, copy_stream=None, copy_events=None):
        with torch.cuda.stream(copy_stream):
            torch.cuda._sleep(SLEEP_CYCLES)
        return read_layer(store, i, flat, staging, io_bandwidth, copy_stream, copy_events)
    pending = []
    acquire = osk.LayerStreamer.acquire

    def acquire_and_look(self, i):
        slot = acquire(self, i)
        k = next(k for k, s in enumerate(self.slots) if s is slot)
        pending.append((i, not self.copied[k].query()))
        return slot
    monkeypatch.setattr(osk, "read_layer", slow_copy)
    monkeypatch.setattr(osk.LayerStreamer, "acquire", acquire_and_look)
    for _ in range(2):
        assert torch.equal(logits(model, ids), reference)
    assert pending == [(i, True) for i in LAYERS] * 2


@pytest.mark.parametrize("prefetch, layers", [(1, LAYERS), (2, [1, 3, 5, 7])])
def test_a_slot_is_refilled_only_after_the_compute_that_reads_it(prefetch, layers, tmp_path, prompt_ids,
                                                                monkeypatch):
    """Slow compute (a spinning kernel before each offloaded layer) and one slot fewer than the
    streamed layers: the read-ahead refills the slot a layer released with another layer while
    the released one's compute is still queued. The logits are exact, so each copy into a slot
    waited for the event of the compute that read it."""
    model, ids = _model_and_ids(prompt_ids)
    reference = logits(model, ids)
    ctl = patch_model(model, layers, tmp_path, mode="stream", prefetch=prefetch, progress=False)
    _spin_before(ctl.layer_modules[i] for i in layers)
    refilled_while_read = []
    read = osk.LayerStreamer._read

    def look_then_read(self, i, slot):
        refilled_while_read.append(self.freed[slot] is not None and not self.freed[slot].query())
        return read(self, i, slot)
    monkeypatch.setattr(osk.LayerStreamer, "_read", look_then_read)
    for _ in range(2):
        assert torch.equal(logits(model, ids), reference)
    assert len(ctl.residencies.streamer.slots) == prefetch + 1 == len(layers) - 1
    assert any(refilled_while_read)  # what the exactness above rests on did happen


@pytest.mark.parametrize("prefetch", [0, 2])
def test_read_ahead_hides_reads_behind_compute(prefetch, tmp_path, prompt_ids, monkeypatch):
    """Compute slower than a read (a spinning kernel before each offloaded layer). Prefetch 0:
    every read is in the compute's way, wait_s is the reads' host time. Prefetch 2: the reader
    thread reads while the device computes, so part of that time is never waited for, and
    stats()['overlap'] > 0."""
    model, ids = _model_and_ids(prompt_ids)
    reference = logits(model, ids)
    ctl = patch_model(model, LAYERS, tmp_path, mode="stream", prefetch=prefetch, progress=False)
    _spin_before(ctl.layer_modules[i] for i in LAYERS)
    host_s = []  # each read's host seconds, as read_layer returns them
    read_layer = osk.read_layer

    def timed(*args):
        seconds = read_layer(*args)
        host_s.append(seconds)
        return seconds
    monkeypatch.setattr(osk, "read_layer", timed)
    for _ in range(2):
        assert torch.equal(logits(model, ids), reference)
    ctl.standby(release=False)  # no read still in flight
    stats = ctl.stats()
    assert stats["loads"] == len(host_s)
    if prefetch == 0:
        assert stats["wait_s"] == pytest.approx(sum(host_s))
    else:
        assert stats["wait_s"] < sum(host_s) and stats["overlap"] > 0


# --------------------------------------------------------------------------- device memory

@pytest.mark.parametrize("mode, prefetch", [("session", 0), ("stream", 0), ("stream", 2)])
def test_standby_gives_the_device_back_to_the_resident_weights(mode, prefetch, tmp_path, prompt_ids):
    model, ids = _model_and_ids(prompt_ids)
    reference = logits(model, ids)
    outside = _allocated_outside(model)
    ctl = patch_model(model, LAYERS, tmp_path, mode=mode, prefetch=prefetch, progress=False)
    resident = list(osk.module_tensors(model))
    assert ctl.resident_bytes() == osk.tensor_bytes(resident, "cuda")
    assert torch.equal(logits(model, ids), reference)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() > outside + allocated_bytes(resident)  # the layers' buffers
    ctl.standby()
    assert ctl.resident_bytes() == osk.tensor_bytes(resident, "cuda")
    assert torch.cuda.memory_allocated() == outside + allocated_bytes(resident)


def test_the_reported_standby_vram_is_the_weights_counted(tmp_path, prompt_ids):
    """bench.measure_memory on CUDA: the rows' standby VRAM (cuda_allocated_bytes) is the weights
    their standby_bytes counts, in the allocator's blocks, and nothing else of the model's."""
    model, ids = _model_and_ids(prompt_ids)
    reference = logits(model, ids)
    outside = _allocated_outside(model)
    ctl = patch_model(model, LAYERS, tmp_path, mode="stream", prefetch=2, progress=False)
    assert torch.equal(logits(model, ids), reference)
    run = bench.Run(types.SimpleNamespace(), model, None, {}, LAYERS, [], None, None, ids)
    memory = bench.measure_memory(run, ctl)
    resident = list(osk.module_tensors(model))
    assert memory.standby_bytes == ctl.resident_bytes() == osk.tensor_bytes(resident, "cuda")
    assert sum(memory.parts.values()) == memory.standby_bytes
    assert memory.cuda_allocated_bytes == outside + allocated_bytes(resident)
    assert memory.cuda_reserved_bytes >= memory.cuda_allocated_bytes
