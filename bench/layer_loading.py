"""Loading a model larger than the device: the layers to be offloaded never sit on it together,
nor beside the rest of the model.

1. ``store_offloaded_layers``: a skeleton of the model on the meta device (no memory); each
   offloaded layer in turn is made real on the device as ``from_pretrained`` would make it
   (each tensor read from the checkpoint and cast to the model's dtype; NF4 quantised by
   bitsandbytes on the device it will run on, so the stored bytes are the computed bytes),
   written by ``offload_skip.store_layers`` and dropped. The device holds one layer at most.
2. ``load_resident``: ``from_pretrained`` of the same checkpoint as a model of only the
   resident layers (a config with fewer layers; ``key_mapping`` renumbers their tensors and
   sends the offloaded ones' to names nothing loads), so bitsandbytes quantises it as usual.
3. ``assemble``: the full layer list again, the resident layers at their own indices (their
   ``layer_idx`` restored) and the skeleton's stored, emptied layers (their structure:
   bitsandbytes modules and quant states) in between, the config restored; then
   ``patch_model(store=...)`` binds those to their files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import offload_skip

from .base import UsageError


def decoder_layer_prefix(model: nn.Module) -> str:
    """The module path of the decoder layer list (``model.layers``)."""
    layers = offload_skip.find_decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


class CheckpointReader:
    """Tensors of a local safetensors checkpoint by name, read one at a time (on the CPU)."""

    def __init__(self, source: str):
        folder = Path(source)
        if not folder.is_dir():
            from transformers.utils import cached_file
            index = cached_file(source, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
            single = None if index else cached_file(source, "model.safetensors")
            folder = Path(index or single).parent
        index_path = folder / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open
            path = folder / "model.safetensors"
            with safe_open(path, framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), path)
        else:
            raise UsageError(f"{folder}: no model.safetensors (or its index): loading layer by layer needs a "
                             "safetensors checkpoint")

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        path = self.files.get(name)
        if path is None:
            raise UsageError(f"tensor {name} is not in the checkpoint under that name; loading layer by layer "
                             "needs a checkpoint whose tensor names are the model's")
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)


def skeleton(source: str, dtype: torch.dtype, quantization_config=None) -> nn.Module:
    """The model on the meta device (it holds no memory), with the config, name and weight
    format the loaded model will have: store_layers' fingerprint is then that model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config._name_or_path = source
    if quantization_config is not None:
        model.config.quantization_config = quantization_config
    return model.eval()


def layer_materializer(source: str, prefix: str, device: torch.device | str, dtype: torch.dtype,
                       quantization_config=None) -> Callable[[int, nn.Module], None]:
    """materialize(i, layer): make decoder layer i (meta tensors) real on `device`: every tensor
    read from the checkpoint and cast to the model's dtype, its nn.Linear modules NF4-quantised
    on the device as from_pretrained's bitsandbytes path does (``quantization_config``: the
    NF4 config, or None)."""
    reader = CheckpointReader(source)
    device = torch.device(device)

    def materialize(i: int, layer: nn.Module) -> None:
        if quantization_config is not None:
            from transformers.integrations.bitsandbytes import replace_with_bnb_linear
            replace_with_bnb_linear(layer, modules_to_not_convert=[], quantization_config=quantization_config)
        for name, param in list(layer.named_parameters()):
            owner_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            value = reader.get(f"{prefix}.{i}.{name}")
            if type(param).__name__ == "Params4bit":
                import bitsandbytes as bnb
                # what transformers' Bnb4bitQuantize does: the value in the model's dtype, then
                # Params4bit with the meta parameter's settings, quantised by the move to the device
                new = bnb.nn.Params4bit(value.to(device, dtype), requires_grad=False, **param.__dict__).to(device)
            else:
                new = nn.Parameter(value.to(device, param.dtype), requires_grad=False)
            owner._parameters[attr] = new
        meta = [name for name, t in layer.named_buffers() if t.device.type == "meta"]
        if meta:
            raise UsageError(f"layer {i}: buffers {meta} are not in the checkpoint; this model cannot be "
                             "loaded layer by layer")
        if device.type == "cpu":
            offload_skip.prepack_nf4_for_cpu(layer)

    return materialize


def store_offloaded_layers(source: str, layers: list[int], layers_dir: Path, device: str, dtype: torch.dtype,
                           quantization_config=None) -> tuple[nn.Module, "offload_skip.LayerStore"]:
    """Step 1: (the skeleton holding the stored layers' emptied modules, their store)."""
    model = skeleton(source, dtype, quantization_config)
    prefix = decoder_layer_prefix(model)
    materialize = layer_materializer(source, prefix, device, dtype, quantization_config)
    return model, offload_skip.store_layers(model, layers, layers_dir, materialize, device)


def resident_config(source: str, offloaded: list[int]):
    """(the config of a model of the resident layers only, the resident indices, the restore
    function that makes a loaded model's config the full one again)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    text = config.get_text_config()
    n_layers, layer_types = text.num_hidden_layers, getattr(text, "layer_types", None)
    resident = [i for i in range(n_layers) if i not in set(offloaded)]
    text.num_hidden_layers = len(resident)
    if layer_types is not None:
        text.layer_types = [layer_types[i] for i in resident]

    def restore(loaded_text) -> None:
        loaded_text.num_hidden_layers = n_layers
        if layer_types is not None:
            loaded_text.layer_types = list(layer_types)
    return config, resident, restore


def key_mapping(prefix: str, n_layers: int, resident: list[int]) -> dict[str, str]:
    """Checkpoint names -> the resident-only model's: resident layer i becomes layer k (its rank),
    an offloaded layer's tensors go to names no module has (skipped as unexpected). The rules
    are applied in turn and in this order, ascending; a renamed key (k <= i) never matches a
    later rule, whose source index is larger."""
    rank = {i: k for k, i in enumerate(resident)}
    escaped = prefix.replace(".", r"\.")
    return {rf"^{escaped}\.{i}\.": (f"{prefix}.{rank[i]}." if i in rank else f"offloaded_by_offload_skip.{i}.")
            for i in range(n_layers)}


def assemble(model: nn.Module, skeleton_model: nn.Module, resident: list[int], restore, prefix: str) -> None:
    """The loaded resident-only model becomes the full one: its layer list holds the resident
    layers at their own indices (layer_idx restored) and the skeleton's stored layers between
    them, reading the loaded model's config; the config says the full layer count again."""
    compact = offload_skip.find_decoder_layers(model)
    stored = offload_skip.find_decoder_layers(skeleton_model)
    text = model.config.get_text_config()
    restore(text)
    configs = {name: mod.config for name, mod in compact[0].named_modules() if "config" in vars(mod)}
    layers = []
    for i in range(len(stored)):
        if i in resident:
            layer = compact[resident.index(i)]
            for mod in layer.modules():
                if "layer_idx" in vars(mod):
                    mod.layer_idx = i
        else:
            layer = stored[i]
            for name, mod in layer.named_modules():
                if name in configs and "config" in vars(mod):
                    mod.config = configs[name]
        layers.append(layer)
    parent, _, attr = prefix.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.ModuleList(layers))
    for mod in model.modules():  # attributes derived from the layer types at init (Qwen2, Gemma 3)
        if "has_sliding_layers" in vars(mod) and getattr(text, "layer_types", None) is not None:
            mod.has_sliding_layers = "sliding_attention" in text.layer_types
