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


# On CUDA bitsandbytes computes NF4 one way, its CUDA kernels: no repacking, nothing to choose.
CUDA_NF4 = "nf4"


def skip_without_bitsandbytes() -> None:
    """A machine may lack bitsandbytes (gpu_check.sh installs it from wheels/ where it can):
    its NF4 cases are skipped, saying so, instead of failing."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: NF4 cases skipped")


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


def tiny_nf4_model(path, arch: str = "llama", nf4_path: str = "dequant", device: str = "cpu"):
    """The tiny model saved to `path` and loaded in NF4 onto `device`, where bitsandbytes
    quantises it; on a CPU computing the `nf4_path` way (on CUDA there is one way)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    tiny_model(arch).save_pretrained(path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": device}).eval()
    return use_nf4_path(model, nf4_path) if device == "cpu" else model


def make_model(kind: str, tmp_path, device: str = "cpu"):
    """kind: '<arch>-<fp32|bf16>', 'nf4-<dequant|packed>' (bitsandbytes on CPU, see NF4_KINDS) or,
    on CUDA, CUDA_NF4. Built on the CPU and moved to `device`; NF4 is quantised there."""
    if kind == CUDA_NF4:
        if device != "cuda":
            raise ValueError(f"{kind!r} is bitsandbytes' CUDA path; on a CPU use one of {NF4_KINDS}")
        skip_without_bitsandbytes()
        return tiny_nf4_model(tmp_path / "nf4-src", device=device)
    if kind.startswith("nf4-"):
        if device != "cpu":
            raise ValueError(f"{kind!r} is a CPU path of bitsandbytes; on {device} use {CUDA_NF4!r}")
        return tiny_nf4_model(tmp_path / "nf4-src", nf4_path=kind.split("-", 1)[1])
    arch, dtype = kind.split("-")
    return tiny_model(arch, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).to(device)


# --------------------------------------------------------------------------- devices
# The core equality tests run on the CPU always and on CUDA where there is a GPU: those cases
# carry the `cuda` marker (pytest -m cuda selects exactly them) and, without a GPU, are skipped
# with NO_CUDA as the reason (pytest -rs shows it).

NO_CUDA = "no CUDA device: torch.cuda.is_available() is False"
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def on_cuda(cases) -> list:
    """The cases a test runs on CUDA: its CPU cases with NF4_KINDS folded into CUDA_NF4."""
    folded = [CUDA_NF4 if case in NF4_KINDS else case for case in cases]
    return list(dict.fromkeys(folded))


def _case_id(case) -> str:
    return "-".join(map(str, case)) if isinstance(case, tuple) else str(case)


def with_devices(cases, cuda=None) -> list:
    """Parameters for a test's (case..., device): each case on "cpu" under the id it had before
    tests took a device (its CPU cases keep their names), then each case of `cuda` (default:
    on_cuda(cases)) on "cuda", id "cuda-<case>", with DEVICES' cuda marks. A case is a value
    or a tuple of values (several argument names)."""
    cuda = on_cuda(cases) if cuda is None else cuda
    params = []
    for device in DEVICES:
        name, marks = (device, ()) if isinstance(device, str) else (device.values[0], device.marks)
        chosen, prefix = (cases, "") if name == "cpu" else (cuda, f"{name}-")
        for case in chosen:
            values = case if isinstance(case, tuple) else (case,)
            params.append(pytest.param(*values, name, marks=marks, id=prefix + _case_id(case)))
    return params


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
