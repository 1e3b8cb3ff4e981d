"""A tiny random causal LM saved with a tokenizer, so the scripts can load it by path.

The tokenizer is character level (WordLevel over printable ASCII and newline), built in
code from the `tokenizers` library: any English text tokenizes without a download, and
the config's vocab_size is the tokenizer's.
"""
from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_config


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<eos>", "[UNK]", "\n"] + [chr(c) for c in range(32, 127)]
    tokenizer = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="<eos>")


def save_tiny_checkpoint(path: Path, arch: str = "llama", n_layers: int = 8, seed: int = 0,
                         tied: bool = False) -> Path:
    """Write config, fp32 safetensors weights and tokenizer files to `path`; returns it.
    tied: the output head shares the input embedding's matrix (SmolLM2, Gemma 3)."""
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    config = tiny_config(arch, n_layers)
    config.vocab_size = len(tokenizer)
    config.max_position_embeddings = 1024
    config.eos_token_id = tokenizer.eos_token_id
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a real spread of weights, like conftest's tiny models
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
