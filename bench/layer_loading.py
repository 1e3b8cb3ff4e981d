"""Loading a model larger than the device: the layers to be offloaded never sit on it together,
nor beside the rest of the model.

``from_pretrained`` builds the model on the meta device (bitsandbytes modules already in
place), then loads every tensor of the checkpoint into it. ``load_streamed`` runs it with
two steps added, through a subclass of the model's class (no global patching):

1. before any weight is loaded, each offloaded layer in turn is made real on the device as
   from_pretrained would make it (each tensor read from the checkpoint, cast to the model's
   dtype, NF4-quantised by bitsandbytes on the device it will run on, so the stored bytes
   are the computed bytes), written by ``offload_skip.store_layers`` and emptied. The device
   holds one layer at most;
2. the emptied layers are taken out of the model while from_pretrained loads the rest (their
   checkpoint tensors then match no parameter and are skipped, silently) and put back once
   it has finished. ``patch_model(store=...)`` binds them to their files.

So the device's peak while loading is the larger of one layer and the resident part (each plus
the one tensor being quantised, in the load dtype), not the whole model: what lets Qwen2.5-7B
in NF4 (~5.5 GB) start on a 6 GB card.
"""
from __future__ import annotations

import re
import weakref
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
    """Tensors of safetensors checkpoint files by name, read one at a time (on the CPU)."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        if not files or not all(str(f).endswith(".safetensors") for f in files):
            raise UsageError(f"loading layer by layer needs a safetensors checkpoint, got {files}")
        self.files: dict[str, Path] = {}
        for path in map(Path, files):
            with safe_open(path, framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), path))

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files.get(name)
        if path is None:
            raise UsageError(f"tensor {name} is not in the checkpoint under that name; loading layer by layer "
                             "needs a checkpoint whose tensor names are the model's")
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)


def layer_materializer(reader: CheckpointReader, prefix: str, device: torch.device,
                       dtype: torch.dtype) -> Callable[[int, nn.Module], None]:
    """materialize(i, layer): make decoder layer i (meta tensors; bitsandbytes modules already
    in place) real on `device`: every tensor read from the checkpoint and cast to its meta
    parameter's dtype; a bitsandbytes 4-bit weight cast to the load's `dtype`, then quantised
    on the device as transformers' Bnb4bitQuantize does it."""

    def materialize(i: int, layer: nn.Module) -> None:
        for name, param in list(layer.named_parameters()):
            owner_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            value = reader.get(f"{prefix}.{i}.{name}")
            if type(param).__name__ == "Params4bit":
                import bitsandbytes as bnb
                # Params4bit with the meta parameter's settings (quant type, blocksize,
                # storage), quantised by the move to the device
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


class _Absent(nn.Module):
    """Stands where a stored layer was while from_pretrained loads the rest: no tensors, so
    the layer's checkpoint tensors match nothing."""


# what a Streamed model's loading hands from one step to the next, kept beside the model
# rather than on it: the store (until load_streamed takes it) and the stored layers' modules
_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STORED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _streamed_class(base: type, offloaded: list[int], layers_dir: Path, device: torch.device, progress: bool):
    """A subclass of the model class whose from_pretrained stores `offloaded` first (step 1)
    and loads the rest without them (step 2); the store ends up in ``_STORES[model]``."""

    class Streamed(base):
        @staticmethod
        def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
            if state_dict is not None:
                raise UsageError("loading layer by layer needs checkpoint files, not a state dict")
            layer_list = offload_skip.find_decoder_layers(model)
            prefix = decoder_layer_prefix(model)
            materialize = layer_materializer(CheckpointReader(checkpoint_files), prefix, device, load_config.dtype)
            _STORES[model] = offload_skip.store_layers(model, offloaded, layers_dir, materialize, device,
                                                       progress=progress)
            _STORED[model] = {i: layer_list[i] for i in offloaded}
            for i in offloaded:
                layer_list[i] = _Absent()
            # the stored layers' checkpoint tensors are skipped on purpose: not "unexpected"
            skipped = rf"^{re.escape(prefix)}\.({'|'.join(map(str, offloaded))})\."
            model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()), skipped}
            return base._load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs)

        @staticmethod
        def _finalize_model_loading(model, *args, **kwargs):
            try:
                return base._finalize_model_loading(model, *args, **kwargs)
            finally:  # after the missing-weight initialisation and tying, which must not see them
                layer_list = offload_skip.find_decoder_layers(model)
                for i, layer in _STORED.pop(model).items():
                    layer_list[i] = layer

    Streamed.__name__ = Streamed.__qualname__ = base.__name__
    Streamed.__module__ = base.__module__
    return Streamed


def load_streamed(source: str, offloaded: list[int], layers_dir: Path, device: str | torch.device,
                  progress: bool = True, **kwargs) -> tuple[nn.Module, "offload_skip.LayerStore"]:
    """``AutoModelForCausalLM.from_pretrained(source, **kwargs)`` with the `offloaded` decoder
    layers stored into `layers_dir` one at a time before the rest is loaded (module
    docstring). Returns (the model, its offloaded layers emptied; the store for
    ``patch_model(..., store=...)``). ``store.peak_bytes`` is the most weight bytes storing
    held on the device."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(source)
    try:
        base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UsageError(f"{source}: {type(config).__name__} is no causal LM config transformers knows") from None
    cls = _streamed_class(base, sorted(offloaded), Path(layers_dir), torch.device(device), progress)
    model = cls.from_pretrained(source, config=config, **kwargs)
    model.__class__ = base  # Streamed holds no state of its own: the model is the base class's
    store = _STORES.pop(model)
    return model, store
