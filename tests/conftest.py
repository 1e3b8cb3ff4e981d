"""Tiny random decoder models built from configs in code: nothing is downloaded."""
import pytest
import torch

ARCHS = ("qwen2", "llama", "gemma3")
N_LAYERS = 8  # default pattern `even` offloads layers 2 and 4 (band 2..4)


def tiny_config(arch: str, n_layers: int = N_LAYERS):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "gemma3":
        # a sliding window shorter than the test prompts, and both layer types offloaded
        layer_types = ["sliding_attention" if i % 3 else "full_attention" for i in range(n_layers)]
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=6, layer_types=layer_types)
    raise ValueError(arch)


def tiny_model(arch: str, dtype=torch.float32, seed: int = 0, n_layers: int = N_LAYERS):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers))
    # random init leaves some weights at exactly zero/one; a real spread exercises the maths
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.to(dtype).eval()


def tiny_nf4_model(path, arch: str = "llama"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    tiny_model(arch).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": "cpu"}).eval()


def make_model(kind: str, tmp_path):
    """kind: '<arch>-<fp32|bf16>' or 'nf4' (bitsandbytes on CPU)."""
    if kind == "nf4":
        return tiny_nf4_model(tmp_path / "nf4-src")
    arch, dtype = kind.split("-")
    return tiny_model(arch, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])


@pytest.fixture
def prompt_ids():
    torch.manual_seed(1)
    return torch.randint(0, 96, (2, 11))
