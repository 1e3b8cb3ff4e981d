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


# bitsandbytes computes NF4 on a CPU in one of two ways. With AVX512-BF16 it repacks each weight
# for a fused kernel at its first forward ("packed"); without, it dequantises every weight at
# every forward ("dequant"). The two store different bytes and round differently, so the tests
# that touch NF4 run both: "dequant" on every CPU (forced on an AVX512-BF16 one), "packed"
# where the CPU has the kernel (skipped, saying so, elsewhere).
NF4_KINDS = ("nf4-dequant", "nf4-packed")


def cpu_has_packed_nf4() -> bool:
    from bitsandbytes.functional import has_avx512bf16
    return bool(has_avx512bf16())


def skip_without_packed_nf4() -> None:
    if not cpu_has_packed_nf4():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes' packed NF4 kernel cannot run here")


def use_nf4_path(model, path: str):
    """Make every bitsandbytes 4-bit layer of `model` compute the `path` way ('dequant' or 'packed')."""
    from bitsandbytes.nn import Linear4bit
    if path not in ("dequant", "packed"):
        raise ValueError(path)
    if path == "packed":
        skip_without_packed_nf4()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = path == "packed"
    return model


def force_nf4_path(quant: str, monkeypatch) -> str:
    """For code that builds its own NF4 layers (the scripts' loaders): 'nf4-dequant' makes every
    4-bit layer built from now on take the dequantising path, 'nf4-packed' needs the CPU's
    kernel. Returns the --quant to pass ('nf4'); other quants pass through."""
    if not quant.startswith("nf4-"):
        return quant
    import bitsandbytes.nn.modules
    if quant == "nf4-packed":
        skip_without_packed_nf4()
    if quant == "nf4-dequant":  # Linear4bit.__init__ asks this once, per layer
        monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)
    return "nf4"


def tiny_nf4_model(path, arch: str = "llama", nf4_path: str = "dequant"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    tiny_model(arch).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": "cpu"}).eval()
    return use_nf4_path(model, nf4_path)


def make_model(kind: str, tmp_path):
    """kind: '<arch>-<fp32|bf16>' or 'nf4-<dequant|packed>' (bitsandbytes on CPU, see NF4_KINDS)."""
    if kind.startswith("nf4-"):
        return tiny_nf4_model(tmp_path / "nf4-src", nf4_path=kind.split("-", 1)[1])
    arch, dtype = kind.split("-")
    return tiny_model(arch, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])


def logits(model, ids):
    with torch.no_grad():  # no KV cache: some tests re-run layers with the captured arguments
        return model(ids, use_cache=False).logits


def greedy(model, ids, n: int):
    """n greedy tokens after `ids` (KV cache on), as model.generate makes them."""
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """No test asks the Hugging Face hub anything, not even whether it is reachable: a hub id
    resolves from the local hub cache or fails at once (tests that need otherwise say so)."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def prompt_ids():
    torch.manual_seed(1)
    return torch.randint(0, 96, (2, 11))
