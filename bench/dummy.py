"""Dummy-weight models: a published shape with seeded random weights (vLLM's ``--load-format
dummy``), for memory and speed at a scale whose weights cannot be fetched here.

Bytes and compute depend on a model's shapes and formats, not on its values, so a dummy
Qwen2.5-14B in NF4 holds and moves exactly the bytes the real one would, and computes as
long. Its outputs mean nothing: a dummy model gets no perplexity and no draft acceptance, and
its rows say ``weights=dummy``.

How one is made (``load_dummy``): the model is built on the meta device (bitsandbytes modules
put in place by transformers' own quantizer, as from_pretrained does), then made real one
decoder layer at a time, each tensor drawn on the target device in the load dtype and, for a
4-bit weight, quantised there at once (``layer_loading.layer_materializer``, the load path's
own). The offloaded layers are made and stored first, one at a time (``store_layers``), as a
streamed load stores them. So no full-precision copy of the model ever exists: the most held
beside the formatted weights is one tensor in the load dtype.

Each tensor's values come from its own generator, seeded by the model's seed and the tensor's
name: the same seed and shape give the same bytes in any order of making, so a dummy model's
layer files are reused like any others (the seed is part of the config, hence of the files'
fingerprint).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import offload_skip

from .layer_loading import decoder_layer_prefix, layer_materializer

PREFIX = "dummy:"
GENERATE_CHUNK_ELEMENTS = 1 << 22  # values drawn at a time: a 16 MB float32 scratch

# The published configs of the instruct models the mission names (the original ran
# Qwen/Qwen2.5-3B-Instruct), transcribed from huggingface.co/Qwen/<repo>/blob/main/config.json.
# The fields that set bytes and compute (hidden, intermediate, layers, heads, KV heads, vocab,
# tied head) are the shapes of ../shared/REFERENCES.md and estimate.py.
_QWEN25 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu", attention_dropout=0.0,
               bos_token_id=151643, eos_token_id=151645, initializer_range=0.02, max_position_embeddings=32768,
               rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, use_cache=True)
SHAPES = {
    "qwen2.5-3b": ("Qwen/Qwen2.5-3B-Instruct", dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, sliding_window=32768,
        max_window_layers=70)),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, sliding_window=131072,
        max_window_layers=28)),
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B-Instruct", dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, sliding_window=131072,
        max_window_layers=70)),
}


def is_dummy(name: str) -> bool:
    return str(name).startswith(PREFIX)


def target(name: str) -> str:
    """What a dummy name names: a SHAPES key, an embedded alias or a checkpoint directory."""
    return str(name)[len(PREFIX):]


def shape_config(key: str):
    """The transformers config of a SHAPES entry."""
    from transformers import AutoConfig

    _, values = SHAPES[key]
    return AutoConfig.for_model(**{**_QWEN25, **values})


def tensor_seed(seed: int, name: str) -> int:
    """A tensor's own generator seed: from the model's seed and the tensor's name only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


class DummyReader:
    """Stands where layer_loading's CheckpointReader reads a checkpoint: each tensor of a meta
    model, drawn on `device` in its load dtype. Matrices (linear weights, embeddings) ~
    N(0, initializer_range), as transformers initialises them; biases 0; norm weights the
    identity (1, or 0 where the norm scales by 1 + weight: Gemma)."""

    def __init__(self, model: nn.Module, seed: int, device: torch.device, dtype: torch.dtype):
        config = model.config.get_text_config()
        self.std = float(getattr(config, "initializer_range", 0.02))
        self.norm_value = 0.0 if str(config.model_type).startswith("gemma") else 1.0
        self.seed, self.device, self.dtype = seed, torch.device(device), dtype
        # a 4-bit weight is drawn in the load dtype at its unquantised shape, which bitsandbytes'
        # meta Params4bit keeps as its shape until it is quantised
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}

    def get(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        if len(shape) < 2:
            return out.fill_(0.0 if name.endswith("bias") else self.norm_value)
        generator = torch.Generator(device=self.device).manual_seed(tensor_seed(self.seed, name))
        # in chunks of rows: normal_ on a low-precision tensor draws in float32 first, and a whole
        # embedding's float32 copy would double the host's peak (14B: 3.1 GB for a 1.6 GB matrix)
        flat = out.view(-1, shape[-1])
        rows = max(1, GENERATE_CHUNK_ELEMENTS // shape[-1])
        for start in range(0, flat.shape[0], rows):
            flat[start:start + rows].normal_(0.0, self.std, generator=generator)
        return out


def _meta_model(config, dtype: torch.dtype, quantization_config):
    """The model on the meta device (its buffers real, on the CPU), bitsandbytes' modules in
    place when quantised; the quantizer, for after its weights are made."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    quantizer = None
    default_dtype = torch.get_default_dtype()
    # the load dtype as the default while the modules are built, as from_pretrained sets it: so
    # the bitsandbytes modules' biases are in it too
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            if quantization_config is not None:
                from transformers.quantizers.auto import AutoHfQuantizer

                quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
                quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None)
    finally:
        torch.set_default_dtype(default_dtype)
    return model, quantizer


def _move_buffers(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != device:
                setattr(module, name, buffer.to(device))  # nn.Module keeps it a buffer, persistent or not


def _make_rest(model: nn.Module, reader: DummyReader, prefix: str, device: torch.device) -> None:
    """The tensors outside the decoder layers (embedding, final norm, head); a tied head takes
    the embedding's matrix (tie_weights, on the meta model first: so it is never drawn)."""
    model.tie_weights()
    layers = re.compile(rf"^{re.escape(prefix)}\.\d+\.")
    for name, param in list(model.named_parameters()):  # a tied matrix once, under the embedding's name
        if layers.match(name) or param.device.type != "meta":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, nn.Parameter(reader.get(name).to(param.dtype), requires_grad=False))  # for the meta one
    if model.config.get_text_config().tie_word_embeddings:
        model.tie_weights()


def load_dummy(config, dtype: torch.dtype, device: str | torch.device, seed: int = 0, quantization_config=None,
               offloaded: list[int] | None = None, layers_dir: Path | None = None, progress: bool = True):
    """(model, store): `config`'s model with seeded random weights (module docstring), in
    `dtype` (the compute dtype under `quantization_config`, a BitsAndBytesConfig) on `device`.
    `offloaded` layers are made and stored into `layers_dir` first, one at a time, and left
    empty for ``patch_model(store=...)``; store is None without them."""
    device = torch.device(device)
    config.dummy_seed = seed  # in the config, so in the layer files' fingerprint
    model, quantizer = _meta_model(config, dtype, quantization_config)
    model.name_or_path = model.config.name_or_path = config.name_or_path
    _move_buffers(model, device)
    reader = DummyReader(model, seed, device, dtype)
    prefix = decoder_layer_prefix(model)
    materialize = layer_materializer(reader, prefix, device, dtype)
    layer_list = offload_skip.find_decoder_layers(model)
    offloaded = sorted(offloaded or [])
    store = None
    if offloaded:
        store = offload_skip.store_layers(model, offloaded, layers_dir, materialize, device, progress=progress)
    kept = [i for i in range(len(layer_list)) if i not in offloaded]
    for i in tqdm(kept, desc="making dummy layers", unit="layer", disable=not progress):
        materialize(i, layer_list[i])
        offload_skip.trim_host_memory()  # the quantiser's scratch, freed between the layers' weights
    _make_rest(model, reader, prefix, device)
    offload_skip.trim_host_memory()
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
    model.eval()
    return model, store


class RandomTokenizer:
    """A stand-in tokenizer where a dummy model has no real one at hand: a text becomes one id
    per word or punctuation mark, each drawn from a generator seeded by the word, so a prompt
    has a stable length and ids. Decoding shows the ids."""

    pad_token = eos_token = "<dummy>"
    pad_token_id = eos_token_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def _ids(self, text: str) -> list[int]:
        return [1 + tensor_seed(0, word) % (self.vocab_size - 1) for word in re.findall(r"\w+|[^\w\s]", text)]

    def __call__(self, text, return_tensors=None, padding=False, padding_side="right"):
        from transformers import BatchEncoding

        batch = [self._ids(t) for t in ([text] if isinstance(text, str) else text)]
        width = max(map(len, batch))
        pad = [[self.pad_token_id] * (width - len(ids)) for ids in batch] if padding else [[] for _ in batch]
        left = padding_side == "left"
        ids = [p + i if left else i + p for p, i in zip(pad, batch)]
        mask = [[0] * len(p) + [1] * len(i) if left else [1] * len(i) + [0] * len(p) for p, i in zip(pad, batch)]
        if isinstance(text, str):
            ids, mask = ids[0], mask[0]
        if return_tensors == "pt":
            ids, mask = torch.tensor(ids), torch.tensor(mask)
            if isinstance(text, str):
                ids, mask = ids[None], mask[None]
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(f"<{int(i)}>" for i in torch.as_tensor(ids).flatten())

    def get_vocab(self) -> dict:
        return {}
