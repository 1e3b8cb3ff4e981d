"""cpu_read="map" (issue 19): on a CPU, an offloaded layer's tensors are views of a private
mapping of its file, not a copy. The views are the mapping, the model computes what it computed
(bit for bit, as the copy path and the unpatched model do), standby() unmaps, damaged files are
named, cold reads still drop the pages, and a mapped layer is accounted as a buffer would be."""
import gc
import os
import re
import warnings
import weakref

import pytest
import torch
from conftest import ARCHS, NF4_KINDS, greedy, logits as _logits, make_model

import offload_skip as osk
from offload_skip import CacheError, patch_model

KINDS = [f"{arch}-{dtype}" for arch in ARCHS for dtype in ("fp32", "bf16")] + list(NF4_KINDS)
LAYERS = [2, 4, 6]  # none adjacent: alpha = 1 is the original model, bit for bit
# (mode, prefetch, how many of LAYERS the budget keeps mapped until standby)
CONFIGS = [("session", 0, 0), ("stream", 0, 0), ("stream", 1, 0), ("stream", 1, 1)]
linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self (Linux)")


def _greedy(model, ids, n=6):
    return greedy(model, ids, n)


def _budget(model, kept: int) -> int:
    """budget_bytes that keeps the first `kept` of LAYERS: their data sections as stored."""
    osk.prepack_nf4_for_cpu(model)  # the stored form, as patch_model makes it (idempotent)
    layers = osk.find_decoder_layers(model)
    sizes = [osk.serialize_layer({name: ref.get() for name, ref in osk.layer_tensor_refs(layers[i]).items()})[0]
             .data_bytes for i in LAYERS]
    return sum(sizes[:kept])


def _patch(model, tmp_path, mode="stream", prefetch=0, kept=0, **kwargs):
    return patch_model(model, LAYERS, tmp_path / "cache", mode=mode, prefetch=prefetch,
                       budget_bytes=_budget(model, kept) if kept else 0, progress=False, **kwargs)


def _held(ctl, mode: str) -> set:
    """The layers mapped between forwards: every computed one, in either mode (a mapping lives
    until standby(); mapping again per token would fault every page in again)."""
    return set(LAYERS)


def _record_mappings(monkeypatch) -> list:
    """(layer, weak reference to its mmap) for every mapping made from now on."""
    made = []
    real = osk.LayerMaps._map

    def recording(self, i):
        flat = real(self, i)
        made.append((i, weakref.ref(self._live[i][0])))
        return flat
    monkeypatch.setattr(osk.LayerMaps, "_map", recording)
    return made


def _closed(ref) -> bool:
    """A recorded mapping is closed (or, closed and unreferenced, gone)."""
    mapping = ref()
    return mapping is None or mapping.closed


def _mapping_of(address: int) -> tuple[str, str]:
    """(file, permissions) of the mapping in /proc/self/maps that holds `address`."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return (fields[5].strip() if len(fields) > 5 else ""), fields[1]
    return "", ""


# --------------------------------------------------------------------------- no copy

@linux_only
@pytest.mark.parametrize("mode, prefetch, kept", CONFIGS)
def test_bound_tensors_are_views_of_the_mapped_file(mode, prefetch, kept, tmp_path, prompt_ids, monkeypatch):
    model = make_model("qwen2-bf16", tmp_path)
    ctl = _patch(model, tmp_path, mode, prefetch, kept)
    smallest = min(ctl.layer_bytes.values())
    allocated = []
    empty = torch.empty

    def recording_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        if tensor.dtype == torch.uint8 and tensor.numel() >= smallest:
            allocated.append(tensor.numel())
        return tensor
    monkeypatch.setattr(torch, "empty", recording_empty)
    seen = {}

    def capture(i):
        def hook(module, args):  # while the layer computes: bound, its file mapped (no view kept here)
            address, nbytes = ctl.residencies.maps.regions()[i]
            tensors = [ref.get() for ref in osk.layer_tensor_refs(module).values()]
            seen[i] = (address, nbytes, _mapping_of(address),
                       [(t.untyped_storage().data_ptr(), t.data_ptr(), t.nbytes) for t in tensors if t.numel()])
        return hook
    hooks = [ctl.layer_modules[i].register_forward_pre_hook(capture(i)) for i in LAYERS]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*still views its mapped file")
        _logits(model, prompt_ids)
    for hook in hooks:
        hook.remove()
    assert sorted(seen) == LAYERS
    for i, (address, nbytes, (path, permissions), tensors) in seen.items():
        assert nbytes == ctl.layer_bytes[i]
        assert path == str(ctl.store.path(i)) and permissions == "rw-p"  # the layer file, privately
        assert len(tensors) >= 2
        for storage, data, size in tensors:
            assert storage == address  # one storage: the mapped data section
            assert address <= data and data + size <= address + nbytes
            assert data % osk.ALIGN_BYTES == 0
    assert allocated == []  # no buffer, no slot of a layer's size
    assert ctl.residencies.streamer is None and ctl.residencies.kept.buffers == {}
    assert set(ctl.residencies.maps.regions()) == _held(ctl, mode)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_a_streamed_mapping_lives_until_standby(prefetch, tmp_path, prompt_ids):
    """No slots, and no mapping given up per token: each layer is mapped at its first use and
    counted as resident from then until standby() (file-backed pages, but held: the peak says
    so); the next forwards reuse the mappings, nothing is loaded again."""
    model = make_model("llama-fp32", tmp_path)
    ctl = _patch(model, tmp_path, prefetch=prefetch)
    standby = ctl.resident_bytes()
    for _ in range(2):
        _logits(model, prompt_ids)
    stats = ctl.stats()
    mapped = sum(ctl.layer_bytes.values())
    assert stats["peak_resident_bytes"] == standby + mapped == ctl.resident_bytes()
    assert stats["loads"] == len(LAYERS) and stats["loaded_bytes"] == mapped
    assert stats["load_s"] > 0 and stats["wait_s"] == pytest.approx(stats["load_s"])
    ctl.standby()
    assert ctl.resident_bytes() == standby


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("mode, prefetch, kept", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_map_equals_copy_and_the_unpatched_model(kind, mode, prefetch, kept, tmp_path, prompt_ids):
    model = make_model(kind, tmp_path)
    logits, tokens = _logits(model, prompt_ids), _greedy(model, prompt_ids)
    for cpu_read in ("copy", "map"):
        ctl = _patch(model, tmp_path, mode, prefetch, kept, cpu_read=cpu_read)
        assert ctl.cpu_read == cpu_read and (ctl.residencies.maps is not None) == (cpu_read == "map")
        for _ in range(2):  # the second time mapped (or read) again, after standby
            assert torch.equal(_logits(model, prompt_ids), logits)
            assert torch.equal(_greedy(model, prompt_ids), tokens)  # KV cache on, through generate
            ctl.standby()
        ctl.unpatch()


def test_unpatched_reads_into_buffers_even_where_layers_are_mapped(tmp_path, prompt_ids):
    """The same-run baseline is the model as loaded: weights in memory of its own, not mapped."""
    model = make_model("gemma3-bf16", tmp_path)
    logits = _logits(model, prompt_ids)
    ctl = _patch(model, tmp_path, mode="session")
    with ctl.unpatched():
        assert ctl.residencies.maps.regions() == {} and sorted(ctl.residencies.kept.buffers) == LAYERS
        assert torch.equal(_logits(model, prompt_ids), logits)
    assert torch.equal(_logits(model, prompt_ids), logits)
    assert sorted(ctl.residencies.maps.regions()) == LAYERS


# --------------------------------------------------------------------------- standby

@pytest.mark.parametrize("mode", ["session", "stream"])
@pytest.mark.parametrize("kind", ["llama-fp32", "gemma3-bf16", *NF4_KINDS])
def test_standby_unmaps_and_the_next_forward_maps_again(kind, mode, tmp_path, prompt_ids, monkeypatch):
    model = make_model(kind, tmp_path)
    logits = _logits(model, prompt_ids)
    ctl = _patch(model, tmp_path, mode, kept=1 if mode == "stream" else 0)  # stream: layer 2 stays mapped
    held = _held(ctl, mode)
    standby = ctl.resident_bytes()
    made = _record_mappings(monkeypatch)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*still views its mapped file")  # a view left behind
        for round_ in range(2):
            assert torch.equal(_logits(model, prompt_ids), logits)
            assert set(ctl.residencies.maps.regions()) == held
            assert ctl.resident_bytes() == standby + sum(ctl.layer_bytes[i] for i in held)
            assert len(made) == len(LAYERS) * (round_ + 1)  # mapped once per standby cycle, whatever the mode
            ctl.standby()
            assert ctl.residencies.maps.regions() == {} and ctl.resident_bytes() == standby
            gc.collect()
            assert all(_closed(ref) for _, ref in made)  # every mapping closed
            for i in LAYERS:  # the views unbound
                assert all(t.numel() == 0 for t in osk.module_tensors(ctl.layer_modules[i]))
            assert len(made) == (round_ + 1) * len(LAYERS)


def test_a_view_held_elsewhere_keeps_its_mapping_until_it_goes(tmp_path, prompt_ids, monkeypatch):
    """mmap.close() with a view alive raises BufferError (the views hold a memoryview's export):
    standby() warns and leaves that mapping to close with the view, never unmapping pages under it."""
    model = make_model("llama-fp32", tmp_path)
    ctl = _patch(model, tmp_path, mode="session")
    made = _record_mappings(monkeypatch)
    _logits(model, prompt_ids)
    weight = ctl.layer_modules[4].mlp.up_proj.weight.detach()  # shares the mapped storage
    expected = weight.clone()
    with pytest.warns(UserWarning, match=re.escape(f"layer 4: a tensor outside the model still views its mapped "
                                                   f"file {ctl.store.path(4)}")):
        ctl.standby()
    mappings = dict(made)
    assert _closed(mappings[2]) and _closed(mappings[6])
    assert mappings[4]() is not None and not mappings[4]().closed
    assert torch.equal(weight, expected)  # still readable: still mapped
    del weight
    gc.collect()
    assert mappings[4]() is None  # unmapped with the last view


# --------------------------------------------------------------------------- damaged files

def _truncated(path):
    return rf"{re.escape(str(path))}: truncated layer file.*; delete {re.escape(str(path.parent))} to rebuild$"


@pytest.mark.parametrize("when", ["before the first forward", "after a forward and standby", "while mapped"])
@pytest.mark.parametrize("mode", ["session", "stream"])
def test_a_truncated_file_is_a_named_cache_error(mode, when, tmp_path, prompt_ids):
    """Never SIGBUS: a file's size is checked when it is mapped and before a live mapping is
    used again (the in-place truncate here keeps the mapped inode, as a writer's rename would not)."""
    model = make_model("llama-fp32", tmp_path)
    kept = len(LAYERS) if mode == "stream" and when == "while mapped" else 0  # stream: mapped across forwards
    ctl = _patch(model, tmp_path, mode, prefetch=1, kept=kept)
    path = ctl.store.path(4)
    if when != "before the first forward":
        _logits(model, prompt_ids)
        if when == "after a forward and standby":
            ctl.standby()
        else:
            assert 4 in ctl.residencies.maps
    os.truncate(path, 100)
    with pytest.raises(CacheError, match=_truncated(path)):
        _logits(model, prompt_ids)
    ctl.standby()
    assert ctl.residencies.maps.regions() == {}


def test_a_file_that_grew_under_its_mapping_is_named(tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    ctl = _patch(model, tmp_path, mode="session")
    _logits(model, prompt_ids)
    path = ctl.store.path(6)
    with open(path, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(CacheError, match=rf"{re.escape(str(path))}: overlong layer file \(\d+ bytes, expected "
                                         r"\d+\) under its mapping"):
        _logits(model, prompt_ids)


def test_a_corrupt_byte_is_caught_when_the_files_are_reused(tmp_path, prompt_ids):
    """Where the copy path catches it: patch_model hashes every file it reuses."""
    model = make_model("llama-fp32", tmp_path)
    ctl = _patch(model, tmp_path, mode="stream")
    _logits(model, prompt_ids)
    ctl.unpatch()
    path = ctl.store.path(4)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"{re.escape(str(path))}: corrupt layer file"):
        _patch(model, tmp_path, mode="stream")


# --------------------------------------------------------------------------- cold reads and read-ahead

@linux_only
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_maps_read_ahead_by_advice_and_drop_nothing(prefetch, tmp_path, prompt_ids, monkeypatch):
    """Each layer is mapped once per standby cycle; read-ahead is posix_fadvise WILLNEED on the
    next layers, nothing else, and no page is dropped (cold reads are the copy path's)."""
    cold = False
    model = make_model("qwen2-bf16", tmp_path)
    logits = _logits(model, prompt_ids)
    ctl = _patch(model, tmp_path, prefetch=prefetch)
    events = []
    fadvise, real_map = os.posix_fadvise, osk.LayerMaps._map

    def recording_fadvise(fd, offset, length, advice):
        events.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), advice))
        return fadvise(fd, offset, length, advice)

    def recording_map(self, i):
        flat = real_map(self, i)  # a cold drop happens inside, before the mapping
        events.append((self.store.path(i).name, "map"))
        return flat
    monkeypatch.setattr(os, "posix_fadvise", recording_fadvise)
    monkeypatch.setattr(osk.LayerMaps, "_map", recording_map)
    for _ in range(2):  # a cycle maps each layer once; standby() gives the mappings up
        assert torch.equal(_logits(model, prompt_ids), logits)
        assert torch.equal(_logits(model, prompt_ids), logits)
        ctl.standby()
    assert [name for name, what in events if what == "map"] == [ctl.store.path(i).name for i in LAYERS] * 2
    dropped = set()
    for name, what in events:
        if what == os.POSIX_FADV_DONTNEED:
            dropped.add(name)
        elif what == os.POSIX_FADV_WILLNEED:
            assert name in dropped or not cold  # the advice reads from the device
        else:
            assert name in dropped or not cold
            dropped.discard(name)
    kinds = {what for _, what in events}
    assert (os.POSIX_FADV_DONTNEED in kinds) == cold
    assert (os.POSIX_FADV_WILLNEED in kinds) == (prefetch > 0)


# --------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("kwargs, message", [
    (dict(cpu_read="mmap"), "cpu_read must be 'map' or 'copy', got 'mmap'"),
    (dict(io_bandwidth=1e9), "io_bandwidth throttles layer reads, and a mapped layer is not read"),
    (dict(cold=True), "cold reads drop a layer file's pages before each read, and a mapped layer is read once and "
                      "kept mapped until standby(): pass cpu_read='copy' for cold reads on a CPU"),
])
def test_patch_model_rejects(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        _patch(make_model("llama-fp32", tmp_path), tmp_path, **kwargs)


def test_throttled_reads_need_the_copy_path(tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    logits = _logits(model, prompt_ids)
    ctl = _patch(model, tmp_path, io_bandwidth=1e9, cpu_read="copy")
    assert ctl.residencies.maps is None and torch.equal(_logits(model, prompt_ids), logits)

