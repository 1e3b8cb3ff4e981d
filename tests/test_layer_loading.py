"""bench.layer_loading: a model whose offloaded layers are stored one at a time from the
checkpoint, before the rest is loaded, is the model loaded whole (same stored bytes, same
logits), and the load never holds more than the larger of one layer and the rest."""
import json

import pytest
import torch
from conftest import CUDA_NF4, NF4_KINDS, force_nf4_path, skip_without_bitsandbytes, with_devices
from tiny_checkpoint import save_tiny_checkpoint

import bench
import offload_skip as osk

OFFLOADED = [2, 4, 5]  # 5 next to 4: a run of two (both computed from the run's input)
IDS = torch.tensor([[5, 17, 33, 2, 60, 41, 8, 9, 71, 12, 3]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    made = {arch: save_tiny_checkpoint(folder / arch, arch=arch, n_layers=8) for arch in ("llama", "qwen2", "gemma3")}
    made["gemma3-tied"] = save_tiny_checkpoint(folder / "gemma3-tied", arch="gemma3", n_layers=8, tied=True)
    return made


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints["llama"]


def _load(checkpoint, quant, tmp_path, offloaded=None, device="cpu"):
    return bench.load_model(str(checkpoint), quant, device, tmp_path / "cache", offloaded=offloaded,
                            layers_dir=tmp_path / "layers")


def _quant(quant, device, monkeypatch) -> str:
    """The --quant to load: on a CPU force_nf4_path's; on CUDA NF4 is bitsandbytes' one path."""
    if device == "cpu":
        return force_nf4_path(quant, monkeypatch)
    if quant == CUDA_NF4:
        skip_without_bitsandbytes()
    return quant


def _patch(model, info, tmp_path):
    return osk.patch_model(model, OFFLOADED, tmp_path / "layers", store=info["store"], progress=False)


def _logits(model):
    with torch.no_grad():
        return model(IDS.to(model.device)).logits


def _manifest(ctl) -> dict:
    return {k: v["sha256"] for k, v in json.loads(ctl.store.manifest_path.read_text())["layers"].items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gemma3-tied"])
@pytest.mark.parametrize("quant, device", with_devices(["fp32", "bf16", *NF4_KINDS]))
def test_streamed_load_is_the_whole_model(checkpoints, arch, quant, device, tmp_path, monkeypatch):
    quant = _quant(quant, device, monkeypatch)
    checkpoint = checkpoints[arch]
    whole, _, info = _load(checkpoint, quant, tmp_path, device=device)
    assert info["store"] is None
    reference = _logits(whole)
    whole_ctl = osk.patch_model(whole, OFFLOADED, tmp_path / "layers-whole", progress=False)

    model, _, info = _load(checkpoint, quant, tmp_path, OFFLOADED, device)
    layers = osk.find_decoder_layers(model)
    for i in range(8):  # the offloaded layers hold no memory: stored, then emptied
        assert (osk.tensor_bytes(osk.module_tensors(layers[i])) == 0) == (i in OFFLOADED)
    assert type(model) is type(whole) and not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert bench.models.embeddings_tied(model) == arch.endswith("tied")  # tied as the checkpoint says
    ctl = _patch(model, info, tmp_path)
    assert ctl.store.dir.name == whole_ctl.store.dir.name  # one fingerprint: either load reuses the cache
    assert _manifest(ctl) == _manifest(whole_ctl)  # the same bytes stored, layer by layer
    patched = _logits(whole)
    assert torch.equal(_logits(model), patched)
    with ctl.session():
        assert torch.equal(_logits(model), patched)
    with ctl.unpatched() as original:
        assert torch.equal(_logits(original), reference)
    whole_ctl.standby()  # its forward above kept its layers (session mode)
    assert ctl.resident_bytes() == whole_ctl.resident_bytes()


@pytest.mark.parametrize("quant, device", with_devices(["fp32", *NF4_KINDS]))
def test_the_load_never_holds_the_offloaded_layers_together(checkpoint, quant, device, tmp_path, monkeypatch):
    quant = _quant(quant, device, monkeypatch)
    whole, _, whole_info = _load(checkpoint, quant, tmp_path, device=device)
    if device == "cpu":  # the CPU's computed form (on CUDA bitsandbytes repacks nothing)
        osk.prepack_nf4_for_cpu(whole)
    layer_bytes = {i: osk.tensor_bytes(osk.module_tensors(osk.find_decoder_layers(whole)[i])) for i in OFFLOADED}
    model, _, info = _load(checkpoint, quant, tmp_path, OFFLOADED, device)
    assert info["loaded_bytes"] == whole_info["loaded_bytes"] - sum(layer_bytes.values())
    # storing held one layer at a time, and nothing else (the rest was loaded afterwards)
    assert info["store"].peak_bytes == max(layer_bytes.values())
    ctl = _patch(model, info, tmp_path)
    assert ctl.load_peak_bytes == max(info["loaded_bytes"], max(layer_bytes.values()))
    # below the whole load by at least the offloaded layers' bytes
    assert ctl.load_peak_bytes <= whole_info["loaded_bytes"] - sum(layer_bytes.values())


def test_whole_load_peak_is_the_whole_model(checkpoint, tmp_path):
    model, _, info = _load(checkpoint, "fp32", tmp_path)
    ctl = osk.patch_model(model, OFFLOADED, tmp_path / "layers", progress=False)
    assert ctl.load_peak_bytes == info["loaded_bytes"]  # everything was loaded before patching


def test_a_store_must_hold_every_offloaded_layer(checkpoint, tmp_path):
    model, _, info = _load(checkpoint, "fp32", tmp_path, OFFLOADED)
    with pytest.raises(ValueError, match="layer 6 is not in the given store"):
        osk.patch_model(model, [*OFFLOADED, 6], tmp_path / "layers", store=info["store"], progress=False)


def test_a_checkpoint_without_the_layers_tensor_names_is_named(checkpoint, tmp_path):
    reader = bench.layer_loading.CheckpointReader([str(checkpoint / "model.safetensors")])
    with pytest.raises(bench.UsageError, match="tensor model.layers.9.mlp.up_proj.weight is not in the checkpoint"):
        reader.get("model.layers.9.mlp.up_proj.weight")


def test_a_checkpoint_that_is_no_safetensors_is_refused(tmp_path):
    with pytest.raises(bench.UsageError, match="needs a safetensors checkpoint, got .*pytorch_model.bin"):
        bench.layer_loading.CheckpointReader([str(tmp_path / "pytorch_model.bin")])
