"""offload_embeddings=True: the input embedding's weight lives in a file and a forward reads only
the rows of its tokens. Exact, accounted for, restored by unpatch(), and a damaged file is named."""
import re
import warnings

import pytest
import torch
from conftest import ARCHS, NF4_KINDS, greedy, logits as _logits, make_model, with_devices
from torch import nn

import offload_skip as osk
from offload_skip import CacheError, patch_model

KINDS = [f"{arch}-{dtype}" for arch in ARCHS for dtype in ("fp32", "bf16")] + list(NF4_KINDS)
VOCAB = 96  # conftest's tiny vocabulary


def _greedy(model, ids, n=4):
    return greedy(model, ids, n)


def _tie(model):
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _model(kind, tmp_path, tied=False, device="cpu"):
    model = make_model(kind, tmp_path, device)
    return _tie(model) if tied else model


def _patch(model, path, tied=False, **kwargs):
    """patch_model with the embedding offloaded; a tied model's warning is expected (and checked)."""
    kwargs = {"mode": "session", "progress": False, "offload_embeddings": True, **kwargs}
    if not tied:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            controller = patch_model(model, "even", path, **kwargs)
        assert not [w for w in record if "tied" in str(w.message)]
        return controller
    with pytest.warns(UserWarning, match="tied"):
        return patch_model(model, "even", path, **kwargs)


def _damage_message(path, message):
    return f"{re.escape(str(path))}: {message}.*; delete {re.escape(str(path.parent))} to rebuild$"


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("mode", ["session", "stream"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind, device", with_devices(KINDS))
def test_offloaded_embedding_is_bit_identical(kind, device, tied, mode, tmp_path, prompt_ids):
    model, ids = _model(kind, tmp_path, tied, device), prompt_ids.to(device)
    logits, tokens = _logits(model, ids), _greedy(model, ids)
    ctl = _patch(model, tmp_path / "cache", tied, mode=mode)
    assert ctl.embedding_residency == ("tied" if tied else "disk")
    assert torch.equal(_logits(model, ids), logits)
    assert torch.equal(_greedy(model, ids), tokens)  # KV cache on, one token per forward
    ctl.standby()
    assert torch.equal(_logits(model, ids), logits)  # and again from disk
    with ctl.unpatched() as original:
        assert not isinstance(original.model.embed_tokens, osk.OffloadedEmbedding)
        assert torch.equal(_logits(original, ids), logits)
    assert isinstance(model.model.embed_tokens, osk.OffloadedEmbedding) != tied
    assert torch.equal(_logits(model, ids), logits)  # the stand-in is back


# --------------------------------------------------------------------------- residency

@pytest.mark.parametrize("kind", [
    "llama-fp32", "qwen2-bf16", *NF4_KINDS,
    "gemma3-fp32",  # its embed_scale buffer stays resident and counted: only the weight leaves
])
def test_untied_embedding_goes_to_disk_and_its_bytes_leave(kind, tmp_path, prompt_ids):
    plain = make_model(kind, tmp_path / "plain")
    offloaded = make_model(kind, tmp_path / "offloaded")
    weight_bytes = offloaded.model.embed_tokens.weight.nbytes
    kept = patch_model(plain, "even", tmp_path / "cache-plain", progress=False)
    ctl = _patch(offloaded, tmp_path / "cache")
    assert ctl.embedding_residency == "disk" and kept.embedding_residency == "resident"
    assert isinstance(offloaded.model.embed_tokens, osk.OffloadedEmbedding)
    assert offloaded.get_input_embeddings() is offloaded.model.embed_tokens
    assert ctl.store.path(osk.EMBEDDING) == ctl.store.dir / "embedding.safetensors"
    assert (ctl.store.dir / "embedding.safetensors").is_file()
    assert not (kept.store.dir / "embedding.safetensors").exists()
    # the stand-in still answers for the original's attributes
    assert offloaded.model.embed_tokens.num_embeddings == VOCAB
    assert offloaded.model.embed_tokens.embedding_dim == offloaded.config.hidden_size
    assert kept.resident_bytes() - ctl.resident_bytes() == weight_bytes
    _logits(offloaded, prompt_ids)
    ctl.standby()
    assert kept.resident_bytes() - ctl.resident_bytes() == weight_bytes  # no row left behind
    # Last: on the packed NF4 path bitsandbytes' state_dict() rewrites every resident 4-bit
    # weight in place into its unpacked layout (other bytes, until the next forward repacks it).
    assert "embed_tokens" not in {k.split(".")[1] for k in offloaded.state_dict() if k.startswith("model.")}


@pytest.mark.parametrize("kind", ["llama-fp32", "gemma3-bf16"])
def test_tied_embedding_stays_resident_with_a_warning(kind, tmp_path, prompt_ids):
    plain = _model(kind, tmp_path / "plain", tied=True)
    tied = _model(kind, tmp_path / "tied", tied=True)
    embedding_type = type(tied.model.embed_tokens)
    kept = patch_model(plain, "even", tmp_path / "cache-plain", progress=False)
    with pytest.warns(UserWarning, match="tied") as record:
        ctl = patch_model(tied, "even", tmp_path / "cache", offload_embeddings=True, progress=False)
    assert len(record) == 1 and "lm_head.weight" in str(record[0].message)
    assert record[0].filename != osk.__file__  # stacklevel points past offload_skip
    assert ctl.embedding_residency == "tied"
    assert type(tied.model.embed_tokens) is embedding_type
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert not ctl.store.path(osk.EMBEDDING).exists()
    assert sorted(p.name for p in ctl.store.dir.iterdir()) == \
        ["layer_2.safetensors", "layer_4.safetensors", "manifest.json"]
    assert ctl.resident_bytes() == kept.resident_bytes()
    _logits(tied, prompt_ids)
    ctl.standby()
    assert ctl.resident_bytes() == kept.resident_bytes()


def test_offload_embeddings_false_changes_nothing(tmp_path):
    model = make_model("qwen2-fp32", tmp_path)
    embedding = model.model.embed_tokens
    ctl = patch_model(model, "even", tmp_path / "cache", progress=False)
    assert ctl.embedding_residency == "resident" and model.model.embed_tokens is embedding
    assert not ctl.store.path(osk.EMBEDDING).exists()
    assert ctl.resident_breakdown()["embedding_bytes"] == embedding.weight.nbytes


# --------------------------------------------------------------------------- rows read

@pytest.mark.parametrize("mode", ["session", "stream"])
@pytest.mark.parametrize("kind", ["llama-fp32", "gemma3-bf16"])
def test_a_forward_reads_only_the_rows_of_its_tokens(kind, mode, tmp_path, prompt_ids, monkeypatch):
    model = make_model(kind, tmp_path)
    ctl = _patch(model, tmp_path / "cache", mode=mode)
    store = ctl.store
    layout = store.layouts[osk.EMBEDDING]
    entry = layout.entries["weight"]
    row_bytes = (entry.end - entry.start) // entry.shape[0]
    requested, read = [], []
    read_rows, pread = store.read_rows, store._pread

    def spy_rows(key, rows):
        requested.append((key, rows.clone()))
        return read_rows(key, rows)

    def spy_pread(key, fd, target, offset):
        n = pread(key, fd, target, offset)
        if key == osk.EMBEDDING:
            read.append((offset, n))
        return n

    monkeypatch.setattr(store, "read_rows", spy_rows)
    monkeypatch.setattr(store, "_pread", spy_pread)
    for ids in (prompt_ids, torch.tensor([[5, 5, 5, 90, 6, 7, 0]]), torch.tensor([[VOCAB - 1]])):
        requested.clear()
        read.clear()
        _logits(model, ids)
        expected = torch.unique(ids)  # sorted, each once
        assert len(requested) == 1
        key, rows = requested[0]
        assert key == osk.EMBEDDING and torch.equal(rows, expected)
        read_row_ids = []
        for offset, n in read:
            begin = offset - layout.header_bytes - entry.start
            assert begin % row_bytes == 0 and n % row_bytes == 0
            read_row_ids += range(begin // row_bytes, (begin + n) // row_bytes)
        assert read_row_ids == expected.tolist()  # those bytes and nothing else
        runs = 1 + int((expected.diff() != 1).sum())
        assert len(read) == runs  # one read per run of adjacent rows


ROW_SETS = {
    "gaps": [1, 3, 7, 50],
    "adjacent-runs": [2, 3, 4, 10, 11, 60, 61, 62, 63],
    "single": [17],
    "first": [0],
    "last": [VOCAB - 1],
    "first-and-last": [0, VOCAB - 1],
    "all": list(range(VOCAB)),
    "none": [],
}


@pytest.mark.parametrize("kind", ["llama-fp32", "qwen2-bf16"])  # NF4 leaves the embedding unquantised
@pytest.mark.parametrize("rows", ROW_SETS.values(), ids=ROW_SETS.keys())
def test_read_rows_equals_indexing_the_matrix(rows, kind, tmp_path):
    model = make_model(kind, tmp_path)
    weight = model.model.embed_tokens.weight.detach().clone()
    ctl = _patch(model, tmp_path / "cache")
    index = torch.tensor(rows, dtype=torch.int64)
    got = ctl.store.read_rows(osk.EMBEDDING, index)
    assert got.dtype == weight.dtype and got.shape == (len(rows), weight.shape[1])
    assert torch.equal(got, weight[index])


# --------------------------------------------------------------------------- damaged files

TRUNCATIONS = {
    "half": lambda size: size // 2,
    "one-byte-short": lambda size: size - 1,
    "empty": lambda size: 0,
}


@pytest.mark.parametrize("forward_first", [False, True], ids=["fresh", "after-a-forward"])
@pytest.mark.parametrize("mode", ["session", "stream"])
@pytest.mark.parametrize("truncate", TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
def test_truncated_embedding_file_is_named_at_the_next_forward(truncate, mode, forward_first, tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    ctl = _patch(model, tmp_path / "cache", mode=mode)
    if forward_first:  # the file is open now: its size is checked on every read all the same
        _logits(model, prompt_ids)
    path = ctl.store.path(osk.EMBEDDING)
    with open(path, "r+b") as f:
        f.truncate(truncate(path.stat().st_size))
    with pytest.raises(CacheError, match=_damage_message(path, "truncated layer file")):
        _logits(model, prompt_ids)
    ctl.standby()  # no hang with the stream reader's work in flight


def test_a_failed_unpatched_block_leaves_the_stand_ins(tmp_path, prompt_ids):
    model = make_model("llama-fp32", tmp_path)
    ctl = _patch(model, tmp_path / "cache")
    stubs, embedding_stub = list(model.model.layers), model.model.embed_tokens
    path = ctl.store.path(osk.EMBEDDING)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(CacheError, match=_damage_message(path, "truncated layer file")), ctl.unpatched():
        pass
    assert model.model.embed_tokens is embedding_stub
    assert list(model.model.layers) == stubs


DAMAGES = {
    "half": (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), "truncated layer file"),
    "one-byte-short": (lambda p: p.write_bytes(p.read_bytes()[:-1]), "truncated layer file"),
    "corrupt": (lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])),
                "corrupt layer file"),
    "missing": (lambda p: p.unlink(), "layer file is missing"),
}


@pytest.mark.parametrize("kind", ["llama-fp32", "gemma3-bf16"])
@pytest.mark.parametrize("damage, message", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_embedding_file_is_named_when_reused(damage, message, kind, tmp_path):
    ctl = _patch(make_model(kind, tmp_path), tmp_path / "cache")
    path = ctl.store.path(osk.EMBEDDING)
    ctl.store.close()
    damage(path)
    fresh = make_model(kind, tmp_path)  # same weights: the manifest's entry is reused, so checked
    with pytest.raises(CacheError, match=_damage_message(path, message)):
        _patch(fresh, tmp_path / "cache")


def test_cache_with_the_embedding_is_reused(tmp_path, prompt_ids):
    model = make_model("gemma3-fp32", tmp_path)
    logits = _logits(model, prompt_ids)
    ctl = _patch(model, tmp_path / "cache")
    assert sorted(map(str, ctl.store.written)) == ["2", "4", osk.EMBEDDING]
    ctl.unpatch()
    again = _patch(make_model("gemma3-fp32", tmp_path), tmp_path / "cache")
    assert again.store.dir == ctl.store.dir and again.store.written == []
    assert torch.equal(_logits(again.model, prompt_ids), logits)


# --------------------------------------------------------------------------- unpatch

@pytest.mark.parametrize("kind, mode", [
    ("llama-fp32", "session"), ("qwen2-bf16", "stream"), ("gemma3-bf16", "session"), ("gemma3-fp32", "stream"),
    *((kind, "stream") for kind in NF4_KINDS),
])
def test_unpatch_restores_the_embedding(kind, mode, tmp_path, prompt_ids):
    model = make_model(kind, tmp_path)
    osk.prepack_nf4_for_cpu(model)  # NF4: count the form the CPU computes with, as patch_model does
    embedding = model.model.embed_tokens
    embedding_type = type(embedding)
    weight = embedding.weight.detach().clone()
    before = osk.tensor_bytes(osk.module_tensors(model))
    # The tensors the model computes with, by name (packed NF4 as packed). Not state_dict():
    # on the packed path bitsandbytes' state_dict() unpacks the weights in place, lossily
    # (absmax re-quantised), so two calls on one unchanged model need not agree.
    state = {k: t.clone() for k, t in _computed_with(model).items()}
    keys = model.state_dict().keys() if not kind.startswith("nf4") else None
    logits = _logits(model, prompt_ids)
    ctl = _patch(model, tmp_path / "cache", mode=mode)
    _logits(model, prompt_ids)
    with ctl.unpatched():
        pass
    assert ctl.unpatch() is model
    restored = model.model.embed_tokens
    assert restored is embedding and type(restored) is embedding_type
    assert model.get_input_embeddings() is embedding
    assert isinstance(restored.weight, nn.Parameter)
    assert torch.equal(restored.weight, weight)
    assert restored.weight.untyped_storage().nbytes() == weight.nbytes  # a storage of its own
    assert torch.equal(_logits(model, prompt_ids), logits)
    assert osk.tensor_bytes(osk.module_tensors(model)) == before
    after = _computed_with(model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    if keys is not None:
        assert model.state_dict().keys() == keys
    with pytest.raises(RuntimeError, match="unpatched"):
        ctl.on_embedding(prompt_ids)


# --------------------------------------------------------------------------- accounting

def _computed_with(model) -> dict:
    """Every tensor the model holds (parameters, buffers, bitsandbytes quant states), by name."""
    return {name: ref.get() for name, ref in osk.layer_tensor_refs(model).items()}


def _parts_sum(ctl):
    parts = ctl.resident_breakdown()
    assert sum(parts.values()) == ctl.resident_bytes()
    return parts


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", ["llama-fp32", "gemma3-bf16", *NF4_KINDS])
def test_resident_breakdown_sums_to_resident_bytes(kind, tied, tmp_path, prompt_ids):
    model = _model(kind, tmp_path, tied)
    embedding = model.model.embed_tokens
    own_bytes = embedding.weight.nbytes + sum(b.nbytes for b in embedding.buffers())  # gemma3: embed_scale
    head_bytes = model.lm_head.weight.nbytes
    session = _patch(model, tmp_path / "cache", tied, mode="session")
    standby = _parts_sum(session)
    if tied:  # the matrix is counted once, as the embedding
        assert standby["embedding_bytes"] == own_bytes and standby["head_bytes"] == 0
    else:
        buffers = sum(b.nbytes for b in embedding.buffers())  # gemma3's embed_scale stays resident
        assert standby["embedding_bytes"] == buffers and standby["head_bytes"] == head_bytes
    assert standby["offloaded_buffer_bytes"] == 0
    with session.session():
        inside = _parts_sum(session)
        assert inside["offloaded_buffer_bytes"] == sum(session.layer_bytes.values())
        _logits(model, prompt_ids)
        assert _parts_sum(session)["embedding_bytes"] == standby["embedding_bytes"]
    assert _parts_sum(session) == standby
    session.unpatch()
    stream = _patch(model, tmp_path / "cache", tied, mode="stream", cpu_read="copy")
    _logits(model, prompt_ids)
    after = _parts_sum(stream)
    assert after["offloaded_buffer_bytes"] > 0  # the stream slots (a mapped layer is unmapped after its compute)
    assert {k: v for k, v in after.items() if k != "offloaded_buffer_bytes"} == \
        {k: v for k, v in standby.items() if k != "offloaded_buffer_bytes"}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", KINDS)
def test_weight_breakdown_of_the_unpatched_model(kind, tied, tmp_path):
    model = _model(kind, tmp_path, tied)
    embedding = model.model.embed_tokens
    parts = osk.weight_breakdown(model, "cpu")
    assert sum(parts.values()) == osk.tensor_bytes(osk.module_tensors(model), "cpu")
    # the embedding's weight, plus its own buffers (gemma3's embed_scale)
    buffers = sum(b.nbytes for b in embedding.buffers())
    assert parts["embedding_bytes"] == embedding.weight.nbytes + buffers
    assert parts["head_bytes"] == (0 if tied else model.lm_head.weight.nbytes)
    if not kind.startswith("gemma3"):
        assert parts["embedding_bytes"] == embedding.weight.nbytes


# --------------------------------------------------------------------------- token ids

@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1000, -1])
def test_out_of_range_token_id_is_named(bad, tmp_path, prompt_ids):
    model = make_model("qwen2-fp32", tmp_path)
    logits = _logits(model, prompt_ids)
    _patch(model, tmp_path / "cache", mode="stream")
    ids = prompt_ids.clone()
    ids[1, 3] = bad
    with pytest.raises(IndexError, match=rf"token id {bad}\b"):
        _logits(model, ids)
    assert torch.equal(_logits(model, prompt_ids), logits)  # the model still works
