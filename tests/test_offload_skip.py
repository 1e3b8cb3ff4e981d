"""The core's contract: selection, exactness, parallel residuals, residency, the layer store."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import (ARCHS, DEVICES, N_LAYERS, NF4_KINDS, cpu_has_packed_nf4, greedy, logits as _logits, make_model,
                      tiny_model, with_devices)
from safetensors import safe_open
from torch import nn

import offload_skip as osk
from offload_skip import CacheError, patch_model, select_layers

KINDS = [f"{arch}-{dtype}" for arch in ARCHS for dtype in ("fp32", "bf16")] + list(NF4_KINDS)


# --------------------------------------------------------------------------- selection

@pytest.mark.parametrize("num_layers, pattern, expected", [
    (36, "even", list(range(2, 33, 2))),           # the original experiment: 2, 4, ..., 32
    (36, "odd", list(range(3, 33, 2))),
    (36, "every:3", list(range(2, 33, 3))),         # 2, 5, ..., 32
    (36, "every:1", list(range(2, 33))),
    (30, "even", list(range(2, 27, 2))),            # SmolLM2-135M: 13 layers
    (8, "even", [2, 4]),
    (8, " EVEN ", [2, 4]),
    (36, "2,4,7", [2, 4, 7]),
    (36, "2-10,14", list(range(2, 11)) + [14]),
    (36, "0,35", [0, 35]),                          # explicit lists may name any index
    (36, "7, 3", [3, 7]),
    (36, "5-5", [5]),
])
def test_select_layers(num_layers, pattern, expected):
    assert select_layers(num_layers, pattern) == expected


def test_select_layers_band_arguments():
    assert select_layers(10, "even", keep_first=0, keep_last=0) == [0, 2, 4, 6, 8]
    assert select_layers(10, "every:4", keep_first=1, keep_last=1) == [1, 5]


@pytest.mark.parametrize("pattern, message", [
    ("", "layer pattern is empty"),
    ("36", "layer 36 is out of range (model has layers 0..35)"),
    ("2,4,2", "layer 2 is named twice"),
    ("2-6,5", "layer 5 is named twice"),
    ("10-4", "range 10-4 is reversed"),
    ("every:0", "every:N needs a whole number N >= 1"),
    ("every:x", "every:N needs a whole number N >= 1"),
    ("2,,4", "cannot read ''"),
    ("-3", "cannot read '-3'"),
    ("evens", "cannot read 'evens'"),
    ("1.5", "cannot read '1.5'"),
])
def test_select_layers_rejects(pattern, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        select_layers(36, pattern)


def test_select_layers_empty_band():
    with pytest.raises(ValueError, match="selects no layers of a 5-layer model"):
        select_layers(5, "odd")


# --------------------------------------------------------------------------- exactness

def _greedy(model, ids, n=8):
    return greedy(model, ids, n)


@pytest.mark.parametrize("mode", ["session", "stream"])
@pytest.mark.parametrize("kind, device", with_devices(KINDS))
def test_alpha_one_is_bit_identical(kind, device, mode, tmp_path, prompt_ids):
    model, ids = make_model(kind, tmp_path, device), prompt_ids.to(device)
    logits, tokens = _logits(model, ids), _greedy(model, ids)
    ctl = patch_model(model, "even", tmp_path / "cache", mode=mode, progress=False)
    assert [type(layer).__name__ == "OffloadedLayer" for layer in model.model.layers] == \
        [i in (2, 4) for i in range(N_LAYERS)]
    assert torch.equal(_logits(model, ids), logits)
    assert torch.equal(_greedy(model, ids), tokens)  # KV cache on, through model.generate
    ctl.standby()
    assert torch.equal(_logits(model, ids), logits)  # and again from disk


@pytest.mark.parametrize("kind, device", with_devices(["llama-fp32", "gemma3-bf16"]))
def test_session_context_keeps_layers_loaded(kind, device, tmp_path, prompt_ids):
    model, ids = make_model(kind, tmp_path, device), prompt_ids.to(device)
    logits = _logits(model, ids)
    ctl = patch_model(model, "even", tmp_path / "cache", mode="stream", progress=False)
    standby = ctl.resident_bytes()
    with ctl.session():
        assert ctl.resident_bytes() > standby
        loads = ctl.stats()["loads"]
        assert torch.equal(_logits(model, ids), logits)
        assert ctl.stats()["loads"] == loads  # nothing read from disk inside the session
    assert ctl.resident_bytes() == standby


class Skip(nn.Module):
    """A removed layer: returns its input."""
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.mark.parametrize("pattern", ["even", "2,3", "5-7"])
@pytest.mark.parametrize("kind, device", with_devices(["qwen2-fp32", "gemma3-bf16", *NF4_KINDS]))
def test_alpha_zero_is_layer_removal(kind, device, pattern, tmp_path, prompt_ids):
    model, ids = make_model(kind, tmp_path, device), prompt_ids.to(device)
    ctl = patch_model(model, pattern, tmp_path / "cache", alpha=0.0, mode="stream", progress=False)
    patched = _logits(model, ids)
    ctl.unpatch()
    for i in select_layers(N_LAYERS, pattern):
        model.model.layers[i] = Skip()
    assert torch.equal(patched, _logits(model, ids))


@pytest.mark.parametrize("kind", ["llama-fp32", "gemma3-bf16"])
def test_consecutive_layers_are_parallel_residuals(kind, tmp_path, prompt_ids):
    """Layers 2 and 3 offloaded: layer 4 receives x + a2 (L2(x) - x) + a3 (L3(x) - x), x = input of layer 2."""
    model = make_model(kind, tmp_path)
    alpha = {2: 0.75, 3: 0.5}
    seen = {}

    def capture(name):
        def hook(module, args, kwargs):
            seen[name] = (args, kwargs)
        return hook

    handles = [model.model.layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in (2, 3)]
    _logits(model, prompt_ids)
    for h in handles:
        h.remove()
    (x,), kwargs2 = seen[2]
    _, kwargs3 = seen[3]
    with torch.no_grad():
        y2 = model.model.layers[2](x, **kwargs2)
        y3 = model.model.layers[3](x, **kwargs3)  # layer 3 reads layer 2's input, not its output
    x32 = x.float()
    expected = (x32 + alpha[2] * (y2.float() - x32) + alpha[3] * (y3.float() - x32)).to(x.dtype)

    patch_model(model, "2,3", tmp_path / "cache", alpha=alpha, progress=False)
    handle = model.model.layers[4].register_forward_pre_hook(capture(4), with_kwargs=True)
    _logits(model, prompt_ids)
    handle.remove()
    assert torch.equal(seen[4][0][0], expected)


@pytest.mark.parametrize("kind, device", with_devices(["llama-fp32", "gemma3-bf16", *NF4_KINDS]))
def test_offloaded_last_layer(kind, device, tmp_path, prompt_ids):
    model, ids = make_model(kind, tmp_path, device), prompt_ids.to(device)
    logits, tokens = _logits(model, ids), _greedy(model, ids)
    patch_model(model, f"3,{N_LAYERS - 1}", tmp_path / "cache", mode="stream", progress=False)
    assert torch.equal(_logits(model, ids), logits)  # flushed before the final norm
    assert torch.equal(_greedy(model, ids), tokens)


# --------------------------------------------------------------------------- injection distance

@pytest.mark.parametrize("pattern, distance, targets", [
    ("2", 1, {2: 3}),
    ("2", 2, {2: 4}),
    ("even", 2, {2: 5, 4: 6}),     # the resident layers after 2 are 3, 5, 6, 7
    ("even", 3, {2: 6, 4: 7}),
    ("2,3", 2, {3: 5}),            # a parallel run injects once, counted from its end
    ("3,7", 2, {3: 5, 7: None}),   # nothing resident after 7: before the final norm
    ("even", 4, {2: 7, 4: None}),
])
def test_injection_targets(pattern, distance, targets):
    assert osk._injection_targets(N_LAYERS, select_layers(N_LAYERS, pattern), distance) == targets


class _Remember(nn.Module):
    """Reference for a deferred layer: computes L(x) from its own input, hands x on unchanged."""
    def __init__(self, layer, alpha, run, store, target):
        super().__init__()
        self.layer, self.alpha, self.run, self.store, self.target = layer, alpha, run, store, target

    def forward(self, x, *args, **kwargs):
        out = self.layer(x, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        self.run.append(self.alpha * (y.float() - x.float()))
        if self.target is not False:  # the run's last layer: its summed contribution waits for the target
            self.store.setdefault(self.target, []).append(sum(self.run))
            self.run.clear()
        return x


class _AddBefore(nn.Module):
    def __init__(self, layer, index, store):
        super().__init__()
        self.layer, self.index, self.store = layer, index, store

    def forward(self, h, *args, **kwargs):
        deltas = self.store.pop(self.index, [])
        h = (h.float() + sum(deltas)).to(h.dtype) if deltas else h
        out = self.layer(h, *args, **kwargs)
        deltas = self.store.pop(None, []) if self.index == N_LAYERS - 1 else []
        return (out.float() + sum(deltas)).to(out.dtype) if deltas else out


def _reordered_by_hand(model, pattern, distance, alpha, targets):
    """The model with the offloaded layers' contributions moved by hand: wrappers, no controller."""
    layers, store, run = model.model.layers, {}, []
    offloaded = select_layers(N_LAYERS, pattern)
    for i in offloaded:
        layers[i] = _Remember(layers[i], alpha, run, store, targets.get(i, False))
    last = N_LAYERS - 1
    for i in {t for t in targets.values() if t is not None} | ({last} if last not in offloaded else set()):
        layers[i] = _AddBefore(layers[i], i, store)
    if last in offloaded:  # its own wrapper hands on x; the deferred sums go after it
        inner = layers[last]
        layers[last] = _AddBefore(inner, last, store)
    return model


@pytest.mark.parametrize("pattern, distance, targets", [
    ("even", 2, {2: 5, 4: 6}),
    ("even", 3, {2: 6, 4: 7}),
    ("2,3", 2, {3: 5}),
    ("3,7", 2, {3: 5, 7: None}),
])
@pytest.mark.parametrize("kind", ["llama-fp32", "gemma3-bf16", *NF4_KINDS])
def test_inject_distance_equals_a_manual_reordering(kind, pattern, distance, targets, tmp_path, prompt_ids):
    model = make_model(kind, tmp_path)
    ctl = patch_model(model, pattern, tmp_path / "cache", alpha=0.75, inject_distance=distance, progress=False)
    patched, tokens = _logits(model, prompt_ids), _greedy(model, prompt_ids)
    ctl.unpatch()
    reference = _reordered_by_hand(model, pattern, distance, 0.75, targets)
    assert torch.equal(patched, _logits(reference, prompt_ids))
    assert torch.equal(tokens, _greedy(reference, prompt_ids))


@pytest.mark.parametrize("kind, device", with_devices(["qwen2-fp32", *NF4_KINDS]))
def test_inject_distance_one_is_bit_identical(kind, device, tmp_path, prompt_ids):
    model, ids = make_model(kind, tmp_path, device), prompt_ids.to(device)
    logits = _logits(model, ids)
    patch_model(model, "even", tmp_path / "cache", inject_distance=1, mode="stream", progress=False)
    assert torch.equal(_logits(model, ids), logits)


def test_removed_layers_are_never_read(tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "2-5", tmp_path / "cache", alpha={2: 0.0, 4: 0.0}, mode="stream", prefetch=0,
                      progress=False)
    assert (ctl.skipped_layers, ctl.computed_layers) == ([2, 4], [3, 5])
    assert ctl.read_bytes_per_forward() == ctl.layer_bytes[3] + ctl.layer_bytes[5]
    _logits(model, prompt_ids)
    assert ctl.stats()["loads"] == 2 and ctl.stats()["loaded_bytes"] == ctl.read_bytes_per_forward()
    with ctl.unpatched():  # the original model still needs every layer
        assert ctl.stats()["loads"] == 6


def test_single_layer_alpha_uses_lerp(tmp_path, prompt_ids):
    """One pending layer: the next layer gets lerp(x, L(x), alpha)."""
    model = make_model("llama-bf16", tmp_path)
    seen = {}
    handle = model.model.layers[2].register_forward_pre_hook(
        lambda m, a, k: seen.setdefault("in", (a, k)), with_kwargs=True)
    _logits(model, prompt_ids)
    handle.remove()
    (x,), kwargs = seen["in"]
    with torch.no_grad():
        expected = torch.lerp(x.float(), model.model.layers[2](x, **kwargs).float(), 0.3).to(x.dtype)
    patch_model(model, "2", tmp_path / "cache", alpha=0.3, progress=False)
    model.model.layers[3].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("out", a[0]), with_kwargs=True)
    _logits(model, prompt_ids)
    assert torch.equal(seen["out"], expected)


def test_unpatch_restores_the_model(tmp_path, prompt_ids):
    model = make_model("gemma3-bf16", tmp_path)
    originals = list(model.model.layers)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    logits = _logits(model, prompt_ids)
    ctl = patch_model(model, "even", tmp_path / "cache", mode="stream", progress=False)
    _logits(model, prompt_ids)
    assert ctl.unpatch() is model
    assert list(model.model.layers) == originals
    restored = model.state_dict()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert torch.equal(_logits(model, prompt_ids), logits)
    with pytest.raises(RuntimeError, match="unpatched"):
        ctl.on_stub(2, prompt_ids, (), {})


@pytest.mark.parametrize("mode", ["session", "stream"])
def test_unpatched_block_is_the_original_model_for_a_while(mode, tmp_path, prompt_ids):
    model = make_model("qwen2-bf16", tmp_path)
    originals = list(model.model.layers)
    logits = _logits(model, prompt_ids)
    before = osk.tensor_bytes(osk.module_tensors(model), "cpu")
    ctl = patch_model(model, "even", tmp_path / "cache", mode=mode, progress=False)
    stubs = list(model.model.layers)
    standby = ctl.resident_bytes()
    assert standby < before
    with ctl.unpatched() as unpatched:
        assert unpatched is model and list(model.model.layers) == originals
        # the resident tensors plus one loaded buffer (file data, alignment padding included) per layer
        assert osk.tensor_bytes(osk.module_tensors(model), "cpu") == standby + sum(ctl.layer_bytes.values())
        assert torch.equal(_logits(model, prompt_ids), logits)
    assert list(model.model.layers) == stubs and ctl.resident_bytes() == standby
    assert torch.equal(_logits(model, prompt_ids), logits)


def test_offloaded_layer_keeps_its_attributes(tmp_path):
    model = make_model("qwen2-fp32", tmp_path)
    patch_model(model, "even", tmp_path / "cache", progress=False)
    stub = model.model.layers[4]
    assert stub.index == 4 and stub.self_attn.layer_idx == 4
    assert not any(k.startswith("model.layers.4.") for k in model.state_dict())


# --------------------------------------------------------------------------- memory

def _layer_bytes(model, indices):
    return sum(osk.tensor_bytes(osk.module_tensors(model.model.layers[i])) for i in indices)


@pytest.mark.parametrize("kind", ["llama-fp32", "qwen2-bf16", "gemma3-fp32", *NF4_KINDS])
def test_resident_bytes_drop_by_the_offloaded_layers(kind, tmp_path, prompt_ids):
    model = make_model(kind, tmp_path)
    osk.prepack_nf4_for_cpu(model)  # NF4: count the form the CPU computes with, as patch_model does
    before = osk.tensor_bytes(osk.module_tensors(model))
    offloaded = _layer_bytes(model, [2, 4])
    ctl = patch_model(model, "even", tmp_path / "cache", mode="session", progress=False)
    assert ctl.resident_bytes() == before - offloaded
    _logits(model, prompt_ids)
    assert ctl.resident_bytes() > before - offloaded  # session: loaded until standby
    ctl.standby()
    assert ctl.resident_bytes() == before - offloaded
    for i in (2, 4):  # no offloaded tensor is left behind
        assert all(t.numel() == 0 for t in osk.module_tensors(model.model.layers[i]._original))


@pytest.mark.parametrize("prefetch", [0, 1, 2, 5])
def test_stream_peak_counts_its_slots(prefetch, tmp_path, prompt_ids):
    """The read path's slots (a CPU's mapped layers hold none: tests/test_cpu_map.py)."""
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "2,4,5", tmp_path / "cache", mode="stream", prefetch=prefetch, cpu_read="copy",
                      progress=False)
    standby = ctl.resident_bytes()
    _logits(model, prompt_ids)
    stats = ctl.stats()
    slots = min(prefetch + 1, 3)  # capped at the number of streamed layers
    assert stats["peak_resident_bytes"] == standby + slots * max(ctl.layer_bytes.values())
    if prefetch == 0:  # read just in time, each layer once
        assert stats["loads"] == 3 and stats["loaded_bytes"] == sum(ctl.layer_bytes.values())
        assert stats["wait_s"] == pytest.approx(stats["load_s"])
    else:  # read-ahead wraps around to the next token's first layers, at most one per slot
        assert 3 <= stats["loads"] <= 3 + min(prefetch + 1, 3)
    ctl.standby()
    assert ctl.resident_bytes() == standby


@pytest.mark.parametrize("layers, prefetch, slots", [("2,4", 2, 2), ("2,4", 1, 2), ("2,4", 0, 1), ("4", 3, 1)])
def test_stream_never_holds_more_slots_than_streamed_layers(layers, prefetch, slots, tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, layers, tmp_path / "cache", mode="stream", prefetch=prefetch, cpu_read="copy",
                      progress=False)
    logits = _logits(model, prompt_ids)
    assert len(ctl.residencies.streamer.slots) == slots
    assert ctl.stats()["peak_resident_bytes"] - ctl._model_bytes == slots * max(ctl.layer_bytes.values())
    ctl.standby()
    assert torch.equal(_logits(model, prompt_ids), logits)


@pytest.mark.parametrize("prefetch, budget_layers", [(0, 0), (1, 0), (2, 1), (3, 2), (1, 3)])
@pytest.mark.parametrize("kind, device", with_devices(["gemma3-bf16", *NF4_KINDS]))
def test_stream_is_bit_identical_for_any_prefetch_and_budget(kind, device, prefetch, budget_layers, tmp_path,
                                                            prompt_ids):
    model, ids = make_model(kind, tmp_path, device), prompt_ids.to(device)
    logits, tokens = _logits(model, ids), _greedy(model, ids)
    probe = patch_model(model, "2,4,7", tmp_path / "cache", progress=False)  # the files' sizes, padding included
    budget = sum(probe.layer_bytes[i] for i in (2, 4, 7)[:budget_layers])
    probe.unpatch()
    ctl = patch_model(model, "2,4,7", tmp_path / "cache", mode="stream", prefetch=prefetch,
                      budget_bytes=budget, progress=False)
    assert len(ctl.keep) == min(budget_layers, 3)
    for _ in range(2):  # the second pass reads from disk again, after standby
        assert torch.equal(_logits(model, ids), logits)
        assert torch.equal(_greedy(model, ids), tokens)
        ctl.standby()


def test_reader_error_reaches_the_caller(tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "2,4,5", tmp_path / "cache", mode="stream", prefetch=2, cpu_read="copy", progress=False)
    _logits(model, prompt_ids)  # the reader is now ahead, at the next token's layers
    ctl.standby()
    path = ctl.store.path(5)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CacheError, match=f"{path}: truncated layer file"):
        _logits(model, prompt_ids)
    ctl.standby()  # no hang with reads in flight or failed


@pytest.mark.parametrize("nbytes, bandwidth, elapsed_s, delay_s", [
    (1_000_000, None, 0.0, 0.0),
    (1_000_000, 1e6, 0.0, 1.0),
    (1_000_000, 1e6, 0.25, 0.75),
    (1_000_000, 1e6, 2.0, 0.0),   # already slower than the emulated disk
    (24_500_000, 3.5e9, 0.001, 0.006),
])
def test_throttle_delay(nbytes, bandwidth, elapsed_s, delay_s):
    assert osk.throttle_delay_s(nbytes, bandwidth, elapsed_s) == pytest.approx(delay_s)


def test_stats_overlap_definition(tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "even", tmp_path / "cache", mode="stream", prefetch=0, progress=False)
    ctl.counters.totals.update(load_s=2.0, wait_s=0.5, forward_s=4.5)  # compute 4.0 s, 1.5 of 2.0 s read hidden
    assert ctl.stats()["overlap"] == pytest.approx(0.75)
    ctl.counters.totals.update(load_s=2.0, wait_s=2.0, forward_s=3.0)
    assert ctl.stats()["overlap"] == 0.0


@pytest.mark.parametrize("budget_layers, kept", [(0, set()), (1, {2}), (2, {2, 4}), (9, {2, 4})])
def test_budget_keeps_the_first_layers_that_fit(budget_layers, kept, tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    logits = _logits(model, prompt_ids)
    one = _layer_bytes(model, [2])
    ctl = patch_model(model, "even", tmp_path / "cache", mode="stream", prefetch=0, cpu_read="copy",
                      budget_bytes=budget_layers * (one + 4096), progress=False)
    assert ctl.keep == kept
    assert torch.equal(_logits(model, prompt_ids), logits)
    assert torch.equal(_logits(model, prompt_ids), logits)
    assert ctl.stats()["loads"] == len(kept) + 2 * (2 - len(kept))  # kept layers are read once


def test_tied_tensor_is_refused(tmp_path):
    model = make_model("llama-fp32", tmp_path)
    model.model.layers[2].mlp.up_proj.weight = model.model.layers[1].mlp.up_proj.weight
    with pytest.raises(ValueError, match="layer 2 tensor mlp.up_proj.weight shares storage with "
                                         "model.layers.1.mlp.up_proj.weight"):
        patch_model(model, "even", tmp_path / "cache", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="lazy"), "mode must be 'session' or 'stream'"),
    (dict(budget_bytes=-1), "budget_bytes must be >= 0"),
    (dict(prefetch=-1), "prefetch must be >= 0"),
    (dict(io_bandwidth=0), "io_bandwidth must be > 0 bytes/s"),
    (dict(alpha={3: 0.5}), r"alpha names layers that are not offloaded: \[3\]"),
    (dict(layers=[2, 8]), "are not valid indices of a 8-layer model"),
    (dict(layers="every:0"), "every:N"),
    (dict(inject_distance=0), "inject_distance must be a whole number >= 1"),
    (dict(cpu_read="mmap"), "cpu_read must be 'map' or 'copy'"),
])
def test_patch_model_rejects(kwargs, message, tmp_path):
    model = make_model("llama-fp32", tmp_path)
    kwargs = {"layers": "even", **kwargs}
    with pytest.raises(ValueError, match=message):
        patch_model(model, cache_dir=tmp_path / "cache", progress=False, **kwargs)


CONFIG_ERRORS = [
    (dict(mode="lazy"), "mode must be 'session' or 'stream'"),
    (dict(budget_bytes=-1), "budget_bytes must be >= 0"),
    (dict(prefetch=-1), "prefetch must be >= 0"),
    (dict(io_bandwidth=0), "io_bandwidth must be > 0 bytes/s"),
    (dict(inject_distance=0), "inject_distance must be a whole number >= 1"),
    (dict(inject_distance=1.5), "inject_distance must be a whole number >= 1"),
    (dict(cpu_read="mmap"), "cpu_read must be 'map' or 'copy'"),
]


@pytest.mark.parametrize("fields, message", CONFIG_ERRORS)
def test_an_offload_config_is_checked_where_it_is_made(fields, message):
    with pytest.raises(ValueError, match=message):
        osk.OffloadConfig(**fields)


@pytest.mark.parametrize("fields, message", [
    (dict(io_bandwidth=1e9), "io_bandwidth throttles layer reads, and a mapped layer is not read"),
    (dict(cold=True), "cold reads drop a layer file's pages before each read"),
])
def test_what_a_mapped_layer_cannot_do_is_refused_on_a_cpu(fields, message):
    config = osk.OffloadConfig(**fields)
    with pytest.raises(ValueError, match=message):
        config.check_device(torch.device("cpu"))
    osk.OffloadConfig(**fields, cpu_read="copy").check_device(torch.device("cpu"))
    config.check_device(torch.device("meta"))  # off a CPU, cpu_read is ignored


def test_a_config_or_its_fields_patch_alike_and_the_manifest_records_it(tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    config = osk.OffloadConfig(alpha={2: 0.5}, mode="stream", prefetch=0, cpu_read="copy")
    ctl = patch_model(model, "even", tmp_path / "cache", config=config, progress=False)
    by_config = _logits(model, prompt_ids)
    manifest = json.loads(ctl.store.manifest_path.read_text())
    assert manifest["written_with"] == {
        "alpha": {"2": 0.5}, "mode": "stream", "prefetch": 0, "budget_bytes": 0, "io_bandwidth": None,
        "inject_distance": 1, "cold": False, "offload_embeddings": False, "cpu_read": "copy", "keep": None,
        "runs": "parallel", "host_compute": []}
    assert ctl.config is config and ctl.alphas == {2: 0.5, 4: 1.0}
    ctl.unpatch()
    ctl = patch_model(model, "even", tmp_path / "cache", alpha={2: 0.5}, mode="stream", prefetch=0, cpu_read="copy",
                      progress=False)
    assert ctl.config == config and ctl.store.written == []  # the files do not depend on the config
    assert torch.equal(_logits(model, prompt_ids), by_config)
    ctl.unpatch()
    with pytest.raises(TypeError, match=r"an OffloadConfig or its fields, not both \(got \['mode'\]\)"):
        patch_model(model, "even", tmp_path / "cache", config=config, mode="session")


@pytest.mark.parametrize("mode, cpu_read, kinds", [
    ("session", "copy", {2: "KeptBuffers", 4: "KeptBuffers"}),
    ("stream", "copy", {2: "LayerStreamer", 4: "LayerStreamer"}),
    ("session", "map", {2: "LayerMaps", 4: "LayerMaps"}),
    ("stream", "map", {2: "LayerMaps", 4: "LayerMaps"}),
])
def test_each_layer_has_one_residency_and_the_blocks_swap_in_their_own(mode, cpu_read, kinds, tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "even", tmp_path / "cache", mode=mode, cpu_read=cpu_read, progress=False)
    assert {i: type(ctl.residency(i)).__name__ for i in (2, 4)} == kinds
    with ctl.session():
        assert {type(ctl.residency(i)).__name__ for i in (2, 4)} == {"LayerMaps" if cpu_read == "map" else "KeptBuffers"}
    with ctl.unpatched():
        assert {type(ctl.residency(i)).__name__ for i in (2, 4)} == {"KeptBuffers"}
    assert {i: type(ctl.residency(i)).__name__ for i in (2, 4)} == kinds


def test_a_budget_keeps_the_layers_that_fit_and_streams_the_rest(tmp_path):
    model = make_model("llama-fp32", tmp_path)
    probe = patch_model(model, "2,4", tmp_path / "cache", progress=False)
    budget = probe.layer_bytes[2]
    probe.unpatch()
    ctl = patch_model(model, "2,4", tmp_path / "cache", mode="stream", budget_bytes=budget, cpu_read="copy",
                      progress=False)
    assert ctl.keep == {2} and ctl.residency(2) is ctl.residencies.kept and ctl.residency(4) is ctl.residencies.streamer


def test_unsupported_model_and_double_patch(tmp_path):
    with pytest.raises(ValueError, match="unsupported model Linear: expected its decoder layers"):
        patch_model(nn.Linear(2, 2), "even", tmp_path)
    model = make_model("llama-fp32", tmp_path)
    patch_model(model, "even", tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, "odd", tmp_path / "cache", progress=False)


# --------------------------------------------------------------------------- the layer store

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64,
                                   torch.float64, torch.bool])
def test_layer_file_round_trip(dtype, tmp_path):
    torch.manual_seed(0)
    tensors = {
        "w": (torch.randn(7, 5) * 100).to(dtype),
        "scalar": torch.tensor(3).to(dtype),
        "row": (torch.randn(3) * 100).to(dtype),
        "bytes": torch.randint(0, 255, (13,), dtype=torch.uint8),
    }
    layout, chunks = osk.serialize_layer(tensors)
    path = tmp_path / "layer.safetensors"
    osk.atomic_write(path, chunks)
    assert osk.read_layout(path) == layout
    # 256-byte boundaries for every tensor and the data section: what cuBLAS(Lt) can see (format 2)
    assert osk.ALIGN_BYTES == 256 and layout.header_bytes % 256 == 0
    assert all(e.start % 256 == 0 for e in layout.entries.values())
    flat = torch.empty(layout.data_bytes, dtype=torch.uint8)
    store = osk.LayerStore(tmp_path, "", {})
    store.dir, store.layouts[0] = tmp_path, layout
    store.path = lambda i: path
    store.read_into(0, flat)
    for name, view in layout.views(flat).items():
        assert view.dtype == tensors[name].dtype and torch.equal(view, tensors[name])
    with safe_open(path, "pt") as f:  # a valid safetensors file for any reader
        assert {k for k in f.keys() if not k.startswith("__pad__")} == set(tensors)
        for name in tensors:
            assert torch.equal(f.get_tensor(name), tensors[name])


def test_cache_is_reused(tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    logits = _logits(model, prompt_ids)
    ctl = patch_model(model, "even", tmp_path / "cache", progress=False)
    assert ctl.store.written == [2, 4]
    files = {p.name: p.stat().st_mtime_ns for p in ctl.store.dir.iterdir()}
    manifest = json.loads((ctl.store.dir / "manifest.json").read_text())
    assert sorted(manifest["layers"]) == ["2", "4"]
    assert manifest["layers"]["2"]["tensors"]["mlp.up_proj.weight"] == {"dtype": "F32", "shape": [128, 64]}
    ctl.unpatch()
    again = patch_model(model, "even", tmp_path / "cache", progress=False)
    assert again.store.written == []
    assert {p.name: p.stat().st_mtime_ns for p in again.store.dir.iterdir()} == files
    assert torch.equal(_logits(model, prompt_ids), logits)


def test_cache_of_another_model_is_not_reused(tmp_path, prompt_ids):
    first = make_model("llama-fp32", tmp_path)
    ctl = patch_model(first, "even", tmp_path / "cache", progress=False)
    # same name and config, other weights: the same folder, rewritten
    second = tiny_model("llama", seed=7)
    logits = _logits(second, prompt_ids)
    ctl2 = patch_model(second, "even", tmp_path / "cache", progress=False)
    assert ctl2.store.dir == ctl.store.dir and ctl2.store.written == [2, 4]
    assert torch.equal(_logits(second, prompt_ids), logits)
    # another config or dtype: another folder
    third = tiny_model("llama", dtype=torch.bfloat16)
    assert patch_model(third, "even", tmp_path / "cache", progress=False).store.dir != ctl.store.dir


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated layer file"),
    (lambda p: p.unlink(), "layer file is missing"),
])
def test_damaged_file_is_named_at_load(damage, message, tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "even", tmp_path / "cache", mode="stream", progress=False)
    path = ctl.store.path(4)
    damage(path)
    with pytest.raises(CacheError, match=f"{path}: {message}.*; delete {path.parent} to rebuild$"):
        _logits(model, prompt_ids)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated layer file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x01"), "corrupt layer file"),
    (lambda p: p.unlink(), "layer file is missing"),
])
def test_damaged_file_is_named_when_reused(damage, message, tmp_path):
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "even", tmp_path / "cache", progress=False)
    path = ctl.store.path(2)
    ctl.unpatch()
    damage(path)
    with pytest.raises(CacheError, match=f"{path}: {message}.*; delete {path.parent} to rebuild$"):
        patch_model(model, "even", tmp_path / "cache", progress=False)


def test_corrupt_manifest_is_named(tmp_path):
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "even", tmp_path / "cache", progress=False)
    ctl.unpatch()
    ctl.store.manifest_path.write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json: corrupt manifest"):
        patch_model(model, "even", tmp_path / "cache", progress=False)


def test_writes_leave_no_temporary_files(tmp_path):
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "even", tmp_path / "cache", progress=False)
    assert sorted(p.name for p in ctl.store.dir.iterdir()) == \
        ["layer_2.safetensors", "layer_4.safetensors", "manifest.json"]


def test_a_layer_file_of_another_format_is_named(tmp_path):
    layout, chunks = osk.serialize_layer({"w": torch.ones(3)})
    path = tmp_path / "layer_2.safetensors"
    osk.atomic_write(path, [chunks[0].replace(osk.FORMAT.encode(), b"offload-skip/1"), *chunks[1:]])
    with pytest.raises(CacheError, match=f"{path}: layer file format 'offload-skip/1', this version reads "
                                         f"'{osk.FORMAT}'; delete {tmp_path} to rebuild"):
        osk.read_layout(path)


@pytest.mark.parametrize("rows", [7, 4096 // 4, 4096 // 4 + 3])  # data sizes around a 4 KiB page
def test_cold_reads_drop_the_page_cache_and_return_the_same_bytes(rows, tmp_path, monkeypatch):
    torch.manual_seed(0)
    tensors = {"w": torch.randn(rows, 4), "b": torch.randint(0, 255, (rows + 1,), dtype=torch.uint8)}
    layout, chunks = osk.serialize_layer(tensors)
    path = tmp_path / "layer.safetensors"
    osk.atomic_write(path, chunks)
    dropped = []
    fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: (dropped.append(advice), fadvise(fd, off, n, advice)))
    store = osk.LayerStore(tmp_path, "", {}, cold=True)
    store.dir, store.layouts[0] = tmp_path, layout
    store.path = lambda i: path
    for _ in range(2):
        flat = torch.full((layout.data_bytes,), 7, dtype=torch.uint8)
        store.read_into(0, flat)
        assert all(torch.equal(view, tensors[name]) for name, view in layout.views(flat).items())
    assert dropped == [os.POSIX_FADV_DONTNEED] * 2  # before every read
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=f"{path}: truncated layer file"):
        store.read_into(0, flat)
    store.close()


@pytest.mark.parametrize("device", DEVICES)  # cold reads are copies (a mapped layer is kept)
@pytest.mark.parametrize("prefetch", [0, 2])
def test_cold_stream_is_bit_identical(prefetch, device, tmp_path, prompt_ids):
    model, ids = make_model("qwen2-bf16", tmp_path, device), prompt_ids.to(device)
    logits = _logits(model, ids)
    patch_model(model, "even", tmp_path / "cache", mode="stream", prefetch=prefetch, cold=True, cpu_read="copy",
                progress=False)
    assert torch.equal(_logits(model, ids), logits)


def test_cold_reads_need_posix_fadvise(tmp_path, monkeypatch):
    model = make_model("llama-fp32", tmp_path)
    monkeypatch.delattr(os, "posix_fadvise")
    with pytest.raises(ValueError, match="cold reads need os.posix_fadvise"):
        patch_model(model, "even", tmp_path / "cache", mode="stream", cold=True, cpu_read="copy", progress=False)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_reads_without_preadv(prefetch, tmp_path, prompt_ids, monkeypatch):
    """Windows has no os.preadv: per-thread file objects, seek and readinto (reader thread included)."""
    model = make_model("gemma3-bf16", tmp_path)
    logits = _logits(model, prompt_ids)
    monkeypatch.delattr(os, "preadv")
    ctl = patch_model(model, "2,4", tmp_path / "cache", mode="stream", prefetch=prefetch, cpu_read="copy",
                      progress=False)
    for _ in range(2):
        assert torch.equal(_logits(model, prompt_ids), logits)
    assert ctl.store._files  # the fallback ran
    ctl.standby()
    assert ctl.store._files == []


def _cpu_streamer(store, order: list[int], depth: int) -> osk.LayerStreamer:
    """A streamer of its own over `store`'s files, outside any controller."""
    cpu = torch.device("cpu")
    reader = osk.LayerReader(store, cpu, None, osk.Counters(cpu), {i: store.layouts[i].data_bytes for i in order})
    return osk.LayerStreamer(reader, order, depth)


def _interrupt_the_wait_for(streamer, i: int, monkeypatch):
    """acquire(i) interrupted (KeyboardInterrupt) while it waits for i's read; (slot, job)."""
    slot, job = streamer.jobs[i]

    def interrupted(self, timeout=None):
        raise KeyboardInterrupt
    with monkeypatch.context() as patched:
        patched.setattr(type(job), "result", interrupted)
        with pytest.raises(KeyboardInterrupt):
            streamer.acquire(i)
    return slot, job


def test_an_interrupted_wait_never_frees_a_slot_still_being_filled(tmp_path, monkeypatch):
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "2,4", tmp_path / "cache", mode="stream", prefetch=1, progress=False)
    store, gate = ctl.store, threading.Event()
    real_read = store.read_into

    def slow_read(index, out):
        if index == 4:
            gate.wait(30)
        real_read(index, out)
    monkeypatch.setattr(store, "read_into", slow_read)
    streamer = _cpu_streamer(store, [2, 4], 1)
    streamer.acquire(2)  # read now; layer 4 is then read ahead in the background, held at the gate
    slot, job = _interrupt_the_wait_for(streamer, 4, monkeypatch)
    assert not job.done() and slot not in streamer.free_slots  # still being filled: not free
    gate.set()
    job.exception(timeout=30)
    assert slot in streamer.free_slots  # free once the read is over
    streamer.close()


def _slots_accounted(streamer) -> bool:
    """Every slot is either free or held by exactly one pending or finished read, never both."""
    held = [slot for slot, _ in streamer.jobs.values()]
    return sorted([*streamer.free_slots, *held]) == list(range(len(streamer.slots)))


def _layer(store, i) -> torch.Tensor:
    direct = torch.empty(store.layouts[i].data_bytes, dtype=torch.uint8)
    store.read_into(i, direct)
    return direct


@pytest.mark.parametrize("prefetch", [0, 1])
def test_a_read_that_raises_frees_its_slot_and_is_read_again(prefetch, tmp_path, monkeypatch):
    """Synchronous (prefetch 0) or in the reader thread: the failed layer is not kept half read."""
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "2,4", tmp_path / "cache", mode="stream", prefetch=prefetch, progress=False)
    store, failing = ctl.store, {4}
    expected = {i: _layer(store, i) for i in (2, 4)}
    real_read = store.read_into

    def flaky_read(index, out, start=0):
        if index in failing:
            out[: len(out) // 2].fill_(0)  # a partial read
            raise OSError("disk gone")
        real_read(index, out, start)
    monkeypatch.setattr(store, "read_into", flaky_read)
    streamer = _cpu_streamer(store, [2, 4], prefetch)
    streamer.acquire(2)
    streamer.release(2)
    with pytest.raises(OSError, match="disk gone"):
        streamer.acquire(4)
    assert 4 not in streamer.jobs and _slots_accounted(streamer)
    failing.clear()  # the disk is back: the layer is read again, whole
    assert torch.equal(streamer.acquire(4)[: len(expected[4])], expected[4])
    streamer.release(4)
    assert torch.equal(streamer.acquire(2)[: len(expected[2])], expected[2])
    streamer.close()


def test_a_cancelled_read_ahead_frees_its_slot_unfilled(tmp_path, monkeypatch):
    """An interrupt while waiting for a read still queued behind another: it is cancelled, so
    its slot is free at once, and the layer is read afresh when asked for again."""
    model = make_model("llama-fp32", tmp_path)
    ctl = patch_model(model, "2,4,6", tmp_path / "cache", mode="stream", prefetch=2, progress=False)
    store, gate = ctl.store, threading.Event()
    expected = {i: _layer(store, i) for i in (2, 4, 6)}
    real_read = store.read_into

    def gated_read(index, out, start=0):
        if index == 4:
            gate.wait(30)
        real_read(index, out, start)
    monkeypatch.setattr(store, "read_into", gated_read)
    streamer = _cpu_streamer(store, [2, 4, 6], 2)
    streamer.acquire(2)  # then 4 is read ahead (held at the gate) and 6 queued behind it
    slot6, job6 = _interrupt_the_wait_for(streamer, 6, monkeypatch)
    assert job6.cancelled() and slot6 in streamer.free_slots and _slots_accounted(streamer)
    gate.set()
    assert torch.equal(streamer.acquire(4)[: len(expected[4])], expected[4])
    assert torch.equal(streamer.acquire(6)[: len(expected[6])], expected[6])
    streamer.close()


# --------------------------------------------------------------------------- staging (the CUDA read path)

@pytest.mark.parametrize("chunk_bytes", [256, 1000, 4096, 1 << 20])
def test_staging_reads_a_layer_in_bounded_chunks(chunk_bytes, tmp_path):
    """The path every CUDA read takes (two host chunks in turn, each copied to the device
    buffer), run on CPU: the same bytes as a direct read, and never more than 2 chunks held."""
    model = tiny_model("llama")
    ctl = patch_model(model, "even", tmp_path, progress=False)
    staging = osk.Staging(chunk_bytes, torch.device("cpu"))
    assert staging.nbytes == 2 * chunk_bytes
    reads = []
    read_into = ctl.store.read_into
    ctl.store.read_into = lambda i, out, start=0: reads.append((start, len(out))) or read_into(i, out, start)
    for i in ctl.offloaded_layers:
        n = ctl.layer_bytes[i]
        direct, staged = torch.empty(n, dtype=torch.uint8), torch.full((n,), 7, dtype=torch.uint8)
        read_into(i, direct)
        reads.clear()
        osk.read_layer(ctl.store, i, staged, staging, None)
        assert torch.equal(staged, direct)
        assert reads == [(start, min(chunk_bytes, n - start)) for start in range(0, n, chunk_bytes)]


@pytest.mark.parametrize("layer_bytes, chunk_bytes", [
    ({2: 436 << 20, 4: 436 << 20}, 64 << 20),  # an 8B bf16 layer: 128 MiB pinned, not 3 x 436 MiB
    ({2: 1 << 30}, 64 << 20),
    ({2: 10 << 20, 4: 12 << 20}, 16 << 20),    # small layers: the power of two the pinned allocator holds
    ({2: 16 << 20}, 16 << 20),
])
def test_pinned_staging_is_bounded_whatever_the_layer_size(layer_bytes, chunk_bytes):
    assert osk.staging_chunk_bytes(layer_bytes) == chunk_bytes
    assert 2 * osk.staging_chunk_bytes(layer_bytes) <= 2 * osk.STAGING_CHUNK_BYTES == 128 << 20


def test_a_chunk_past_the_data_section_is_refused(tmp_path):
    ctl = patch_model(tiny_model("llama"), "even", tmp_path, progress=False)
    n = ctl.layer_bytes[2]
    with pytest.raises(ValueError, match=f"past the {n}-byte data section"):
        ctl.store.read_into(2, torch.empty(64, dtype=torch.uint8), n - 32)


def test_no_staging_is_held_on_cpu_or_after_standby(tmp_path, prompt_ids):
    model = tiny_model("llama")
    for mode in ("session", "stream"):
        ctl = patch_model(model, "even", tmp_path / mode, mode=mode, progress=False)
        _logits(model, prompt_ids)
        assert ctl.staging_bytes() == 0  # CPU reads go straight into the layer's buffer
        ctl.reader.staging = osk.Staging(1024, torch.device("cpu"))  # as a CUDA run would hold it
        ctl.standby(release=False)
        assert ctl.staging_bytes() == 2048  # kept between timed runs
        ctl.standby()
        assert ctl.staging_bytes() == 0
        ctl.reader.staging = osk.Staging(1024, torch.device("cpu"))
        ctl.unpatch()  # its reads are the last: nothing stays pinned for them
        assert ctl.staging_bytes() == 0


@pytest.mark.parametrize("offload_embeddings", [False, True])
@pytest.mark.parametrize("skip", [[], [4]])
def test_offloaded_bytes_is_what_unpatched_brings_back(tmp_path, offload_embeddings, skip):
    model = tiny_model("qwen2")
    ctl = patch_model(model, [2, 4, 5], tmp_path, alpha={i: 0.0 for i in skip},
                      offload_embeddings=offload_embeddings, progress=False)
    standby = ctl.resident_bytes()
    with ctl.unpatched() as original:  # the weights the whole model holds, each storage once
        assert osk.tensor_bytes(osk.module_tensors(original)) - standby == ctl.offloaded_bytes()
    assert ctl.offloaded_bytes() == sum(ctl.layer_bytes.values()) + (
        model.config.vocab_size * model.config.hidden_size * 4 if offload_embeddings else 0)  # fp32


# --------------------------------------------------------------------------- NF4 on a CPU

@pytest.mark.parametrize("out_features, packable", [(96, True), (98, False), (40, False)])
def test_prepack_packs_only_what_the_fused_kernel_takes(out_features, packable):
    """bitsandbytes' AVX512-BF16 layout needs whole tiles of 32 output rows; another weight stays
    unpacked and is marked so, or bitsandbytes' own first forward would fail an assertion."""
    import bitsandbytes as bnb
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer = layer.to("cpu")  # quantised by the move
    layer.support_avx512bf16_for_cpu = True  # as on such a CPU: the repacking itself is plain torch
    osk.prepack_nf4_for_cpu(layer)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) is packable
    assert layer.support_avx512bf16_for_cpu is packable
    if packable and not cpu_has_packed_nf4():
        return  # the packed kernel cannot run here
    with torch.no_grad():
        assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).shape == (3, out_features)


# --------------------------------------------------------------------------- interpreter exit

LIBRARY_USE = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import torch
from conftest import tiny_model
from offload_skip import patch_model
from speculative import LookupDrafter, speculative_decode

model = tiny_model("qwen2")
ids = torch.tensor([[5, 17, 33, 2, 8, 60]])
ctl = patch_model(model, "even", {cache!r}, mode="{mode}", cpu_read="{cpu_read}", progress=False)
model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
speculative_decode(model, ids, 4, LookupDrafter())
# no standby(), no unpatch(), nothing closed: the interpreter's exit finalizes the store and the
# streamer, when module globals such as contextlib may already be gone
"""


@pytest.mark.parametrize("mode, cpu_read", [("stream", "map"), ("stream", "copy"), ("session", "map")])
def test_the_library_leaves_nothing_on_stderr_at_exit(mode, cpu_read, tmp_path):
    repo = Path(__file__).resolve().parent.parent
    code = LIBRARY_USE.format(repo=str(repo), tests=str(repo / "tests"), cache=str(tmp_path), mode=mode,
                              cpu_read=cpu_read)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (0, "")
