"""bench.dummy: published shapes with seeded random weights, made layer by layer, exact under
patching like any model, and refused wherever their values would be read as a measurement."""
import contextlib
import io
import subprocess
import sys

import pytest
import torch
from conftest import force_nf4_path, skip_without_bitsandbytes, tiny_config, with_devices

import bench
import estimate
import offload_skip
import run_diskoffload
import run_kvcache
from bench import dummy
from bench.models import _nf4_config, model_kind

QUANTS = ("fp32", "bf16", "nf4-dequant", "nf4-packed")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dummy-config")
    tiny_config("qwen2").save_pretrained(path)
    return path


def make(config_dir, quant="fp32", seed=0, offloaded=None, layers_dir=None, device="cpu"):
    """The dummy model of `config_dir`'s config, as load_model makes it, on `device`."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(config_dir)
    config.name_or_path = f"dummy:{config_dir}"
    dtype, quantization = (torch.bfloat16, _nf4_config()) if quant.startswith("nf4") else (DTYPES[quant], None)
    return dummy.load_dummy(config, dtype, device, seed=seed, quantization_config=quantization,
                            offloaded=offloaded, layers_dir=layers_dir, progress=False)


# --------------------------------------------------------------------------- names and shapes

@pytest.mark.parametrize("key, shape", [("qwen2.5-3b", estimate.QWEN25_3B), ("qwen2.5-7b", estimate.QWEN25_7B),
                                        ("qwen2.5-14b", estimate.QWEN25_14B)])
def test_shapes_are_the_ones_the_cost_model_uses(key, shape):
    config = dummy.shape_config(key)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.num_hidden_layers, config.vocab_size, config.tie_word_embeddings) == \
        (shape["hidden"], shape["intermediate"], shape["n_heads"], shape["n_kv_heads"], shape["n_layers"],
         shape["vocab"], shape["tied_head"])
    assert config.model_type == "qwen2" and config.initializer_range == 0.02


@pytest.mark.parametrize("name", ["dummy:qwen2.5-3b", "dummy:qwen2.5-14b", "dummy:smollm2-135m"])
def test_dummy_names(name):
    assert model_kind(name) == "dummy"


def test_a_directory_with_a_config_is_a_dummy_name(config_dir):
    assert model_kind(f"dummy:{config_dir}") == "dummy"


@pytest.mark.parametrize("name", ["dummy:qwen2.5-70b", "dummy:", "dummy:/no/such/dir"])
def test_unknown_dummy_names_are_refused(name):
    with pytest.raises(bench.UsageError, match=r"unknown dummy model .*dummy:SHAPE \(qwen2.5-3b, qwen2.5-7b, "):
        model_kind(name)


# --------------------------------------------------------------------------- values

def test_same_seed_same_bytes_other_seed_other_bytes(config_dir):
    first, second, other = make(config_dir)[0], make(config_dir)[0], make(config_dir, seed=1)[0]
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
        if a.dim() >= 2:
            assert not torch.equal(a, c), name


def test_a_tensor_does_not_depend_on_what_was_made_before_it():
    shapes = {"a.weight": (64, 32), "b.weight": (8, 4)}
    readers = [dummy.DummyReader.__new__(dummy.DummyReader) for _ in range(2)]
    for reader in readers:
        reader.shapes, reader.std, reader.norm_value, reader.seed = shapes, 0.02, 1.0, 7
        reader.device, reader.dtype = torch.device("cpu"), torch.float32
    a_first = readers[0].get("a.weight")
    readers[1].get("b.weight")
    assert torch.equal(readers[1].get("a.weight"), a_first)


def test_values_follow_the_config(config_dir):
    model = make(config_dir)[0]
    q_proj = model.model.layers[0].self_attn.q_proj
    assert abs(q_proj.weight.std().item() - model.config.initializer_range) < 0.002
    assert torch.equal(q_proj.bias, torch.zeros_like(q_proj.bias))
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    assert all(p.device.type == "cpu" for p in model.parameters())
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_a_tied_head_is_the_embedding(tmp_path):
    config = tiny_config("qwen2")
    config.tie_word_embeddings = True
    config.save_pretrained(tmp_path)
    model = make(tmp_path)[0]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("quant", ["fp32", "bf16", "nf4-dequant"])
def test_a_dummy_has_the_checkpoints_tensors_and_bytes(quant, config_dir, tmp_path, monkeypatch):
    """The same config from a real checkpoint, loaded by from_pretrained: the same names, shapes,
    dtypes and byte count (the values differ)."""
    from tiny_checkpoint import save_tiny_checkpoint
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", arch="qwen2")
    quant = force_nf4_path(quant, monkeypatch)
    real, real_tokenizer, _ = bench.load_model(str(checkpoint), quant, "cpu", tmp_path / "cache")
    fake, tokenizer, info = bench.load_model(f"dummy:{checkpoint}", quant, "cpu", tmp_path / "cache")
    assert info["weights"] == "dummy" and tokenizer.get_vocab() == real_tokenizer.get_vocab()
    def described(model):  # less the quant state's JSON blob, a serialisation of numbers whose length varies
        return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()
                if ".quant_state.bitsandbytes__" not in name}
    assert described(fake) == described(real)
    assert offload_skip.tensor_bytes(offload_skip.module_tensors(fake), "cpu") == \
        offload_skip.tensor_bytes(offload_skip.module_tensors(real), "cpu")


# --------------------------------------------------------------------------- patched

@pytest.mark.parametrize("mode", ["session", "stream"])
@pytest.mark.parametrize("quant, device", with_devices(QUANTS))
def test_alpha_one_is_exact_on_a_dummy(quant, device, mode, config_dir, tmp_path, monkeypatch):
    if device == "cpu" and quant.startswith("nf4"):
        quant = force_nf4_path(quant, monkeypatch)
    elif quant.startswith("nf4"):  # bitsandbytes' one CUDA path
        skip_without_bitsandbytes()
    model, store = make(config_dir, quant, offloaded=[2, 4], layers_dir=tmp_path, device=device)
    assert {t.device.type for t in offload_skip.module_tensors(model)} == {device}  # made on the device
    ctl = offload_skip.patch_model(model, [2, 4], tmp_path, mode=mode, store=store, progress=False)
    ids = torch.tensor([[5, 17, 33, 2, 8, 60]], device=device)
    with torch.no_grad():
        patched = model(ids).logits
        with ctl.unpatched():
            original = model(ids).logits
    assert torch.equal(patched, original)


def test_the_offloaded_layers_files_are_reused(config_dir, tmp_path):
    first = make(config_dir, offloaded=[2, 4], layers_dir=tmp_path)[1]
    again = make(config_dir, offloaded=[2, 4], layers_dir=tmp_path)[1]
    other_seed = make(config_dir, seed=3, offloaded=[2, 4], layers_dir=tmp_path)[1]
    assert first.written == [2, 4] and again.written == [] and again.dir == first.dir
    assert other_seed.dir != first.dir


# --------------------------------------------------------------------------- tokens

def test_random_tokenizer_is_stable_and_pads_left():
    tokenizer = dummy.RandomTokenizer(vocab_size=100)
    one = tokenizer("The history of the press, in Europe").input_ids
    assert len(one) == 8 and one == tokenizer("The history of the press, in Europe").input_ids
    assert all(1 <= i < 100 for i in one)
    batch = tokenizer(["a b c", "a"], return_tensors="pt", padding=True, padding_side="left")
    assert batch.input_ids.tolist() == [tokenizer("a b c").input_ids, [0, 0, *tokenizer("a").input_ids]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# --------------------------------------------------------------------------- the scripts

def _argv(config_dir, tmp_path, *extra):
    return ["--model", f"dummy:{config_dir}", "--quant", "fp32", "--device", "cpu", "--cache-dir",
            str(tmp_path / "cache"), "--max-new-tokens", "3", "--warmup", "0", "--repeats", "1", *extra]


def test_a_dummy_row_says_so_and_has_no_perplexity(config_dir, tmp_path, capsys):
    out = tmp_path / "kvcache.csv"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert run_kvcache.main(_argv(config_dir, tmp_path, "--out", str(out))) == 0
    assert f"dummy:{config_dir}: dummy weights, so no perplexity (--ppl-max-tokens 2048 ignored)" in \
        capsys.readouterr().err
    assert "dummy weights (bytes and speed only)" in stdout.getvalue()
    (row,) = bench.read_rows(out)
    assert row["weights"] == "dummy" and row["ppl"] == "" and float(row["decode_tok_s"]) > 0


@pytest.mark.parametrize("script, extra, message", [
    ("eval_ppl.py", (), "has dummy weights: its perplexity means nothing, so eval_ppl.py does not score it"),
    ("run_diskoffload.py", ("--draft", "lookup"), "--draft over dummy:.*: dummy weights accept no draft's tokens"),
])
def test_what_dummy_weights_cannot_answer_is_one_line(script, extra, message, config_dir, tmp_path):
    argv = [a for a in _argv(config_dir, tmp_path, *extra) if script != "eval_ppl.py" or a not in
            ("--max-new-tokens", "3", "--warmup", "0", "--repeats", "1")]
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=bench.REPO_DIR)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"{script}: error: ")
    import re
    assert re.search(message, line)


def test_stream_row_of_a_dummy(config_dir, tmp_path):
    out = tmp_path / "diskoffload.csv"
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_diskoffload.main(_argv(config_dir, tmp_path, "--out", str(out), "--cpu-read", "copy")) == 0
    (row,) = bench.read_rows(out)
    assert row["weights"] == "dummy" and row["mode"] == "stream" and row["layers_offloaded"] == "2 4"
    assert int(row["standby_bytes"]) < int(row["baseline_standby_bytes"])
