"""speculative.py (issue 20): greedy speculative decoding over stream residency. Whatever the
draft proposes, the output is the target's greedy output; a draft that is a perfect copy is
accepted everywhere and the streamed layers are read once per verify; a self draft shares the
target's resident modules and never reaches a layer file; substitutes are stored and checked
like layer files."""
import copy
import math

import pytest
import torch
from conftest import ARCHS, make_model, tiny_model, with_devices

import offload_skip as osk
import speculative as sp
from offload_skip import CacheError, patch_model

N_NEW = 12


def _stream(model, tmp_path, cpu_read="copy"):
    return patch_model(model, "even", tmp_path / "cache", mode="stream", prefetch=0, progress=False,
                       cpu_read=cpu_read)


def _prompt(seed=1, n=9):
    torch.manual_seed(seed)
    return torch.randint(0, 96, (1, n))


@pytest.mark.parametrize("lookup,expected", [
    ([5, 6, 7, 8, 5, 6], [7, 8, 5, 6]),         # the bigram 5 6 seen before: what followed it
    ([1, 2, 3, 9, 2, 3, 4, 2, 3], [4, 2, 3]),   # the latest earlier occurrence wins
    ([1, 2, 3, 4], []),                          # nothing repeats
    ([4, 1, 2, 4], [1, 2, 4]),                   # no bigram match: the unigram's
])
def test_lookup_proposes_what_followed_the_last_ngram(lookup, expected):
    assert sp.LookupDrafter(ngram=2, max_tokens=10).propose(torch.tensor([lookup]), 10) == expected
    assert sp.LookupDrafter(ngram=2, max_tokens=10).propose(torch.tensor([lookup]), 2) == expected[:2]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("draft_tokens, device", with_devices([1, 4]))
def test_a_perfect_draft_is_accepted_everywhere_and_reads_once_per_verify(arch, draft_tokens, device, tmp_path):
    target, prompt = tiny_model(arch).to(device), _prompt().to(device)
    drafter = sp.ModelDrafter(copy.deepcopy(target), confidence=None)
    reference, _ = sp.greedy_reference(target, prompt, N_NEW)
    ctl = _stream(target, tmp_path)
    out = sp.speculative_decode(target, prompt, N_NEW, drafter, draft_tokens=draft_tokens)
    assert torch.equal(out.tokens, reference)
    assert out.accepted == out.drafted
    # the prefill's token, then draft_tokens + 1 per verify (the last verify fills what is left)
    assert out.target_forwards == 1 + math.ceil((N_NEW - 1) / (draft_tokens + 1))
    assert ctl.stats()["loads"] == out.target_forwards * len(ctl.computed_layers)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("draft", ["random-model", "lookup", "none"])
@pytest.mark.parametrize("cpu_read, device", with_devices(["copy", "map"], cuda=["copy"]))  # CUDA copies
def test_any_draft_yields_the_targets_greedy_tokens(arch, draft, cpu_read, device, tmp_path):
    target = tiny_model(arch).to(device)
    prompt = _prompt().to(device)
    reference, _ = sp.greedy_reference(target, prompt, N_NEW)
    plain = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N_NEW,
                            do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
    drafter = {"random-model": lambda: sp.ModelDrafter(tiny_model(arch, seed=7).to(device)),
               "lookup": sp.LookupDrafter, "none": sp.Drafter}[draft]()
    _stream(target, tmp_path, cpu_read)
    out = sp.speculative_decode(target, prompt, N_NEW, drafter, draft_tokens=0 if draft == "none" else 5)
    assert torch.equal(reference, plain)
    assert torch.equal(out.tokens, reference)
    assert out.tokens.shape == (1, N_NEW)
    if draft == "none":
        assert out.target_forwards == N_NEW and out.drafted == 0


@pytest.mark.parametrize("catch_up", [False, True])
@pytest.mark.parametrize("later", [[0, 1], [0, 1, 2, 3, 4, 5]])  # a correction; tokens decoded without the draft
def test_the_draft_cache_keeps_only_agreed_tokens(catch_up, later):
    """A drafter reused across verifies crops its cache to the sequence's agreed prefix and reads
    what it missed (at once, or apart first): its next proposal equals a fresh drafter's."""
    draft_model = tiny_model("llama", seed=3)
    used, fresh = sp.ModelDrafter(draft_model, confidence=None), sp.ModelDrafter(draft_model, confidence=None)
    sequence = _prompt()
    proposal = used.propose(sequence, 4)
    corrected = torch.cat([sequence, torch.tensor([[proposal[0], (proposal[1] + 1) % 96] + later[2:]])], dim=1)
    if catch_up:
        used.catch_up(corrected)
        fresh.catch_up(corrected)
    assert used.propose(corrected, 3) == fresh.propose(corrected, 3) == sp.ModelDrafter(
        draft_model, confidence=None).propose(corrected, 3)


def test_one_sequence_only_and_no_negative_draft(tmp_path):
    target = tiny_model("llama")
    with pytest.raises(ValueError, match="one sequence, got a batch of 2"):
        sp.speculative_decode(target, torch.zeros(2, 4, dtype=torch.long), 3, sp.LookupDrafter())
    with pytest.raises(ValueError, match="draft_tokens must be >= 0"):
        sp.speculative_decode(target, _prompt(), 3, sp.LookupDrafter(), draft_tokens=-1)


# ---------------------------------------------------------------- schedules

def _cycles(schedule, cycles, room=100, unread=0, catch_up_token_s=0.0):
    """Drive a schedule with scripted cycles (draft seconds per token, share of the proposal
    accepted, verify seconds); a draft token time of None: the draft proposes nothing. Before
    each cycle the draft has `unread` tokens to read. Returns what the schedule asked for."""
    asked = []
    for token_s, accepted, verify_s in cycles:
        n = schedule.tokens(room, unread)
        proposed = n if token_s is not None else 0
        read = unread if n else 0
        schedule.record(sp.Cycle(n, proposed, round(accepted * proposed) + 1, read, read * catch_up_token_s,
                                 proposed * token_s if proposed else (0.001 if n else 0.0), verify_s))
        asked.append(n)
    return asked


PLAIN = (0.0, 0, 1.0)        # a one-token verify: 1 s (whatever the schedule asks, nothing is drafted)
CHEAP_WIN = (0.1, 1, 1.0)    # 0.1 s per draft token, every one accepted
CHEAP_LOSS = (0.1, 0, 1.0)   # 0.1 s per draft token, none accepted


@pytest.mark.parametrize("cycles,asked", [
    # the first cycle is a plain step; a draft that keeps winning is asked for twice as much each time
    ([PLAIN] + [CHEAP_WIN] * 6, [0, 2, 4, 8, 16, 20, 20]),
    # a draft that loses waits 4 plain steps, is asked for 2 again, then waits 8
    ([PLAIN, CHEAP_LOSS] + [PLAIN] * 4 + [CHEAP_LOSS] + [PLAIN] * 8 + [CHEAP_WIN] * 2,
     [0, 2, 0, 0, 0, 0, 2] + [0] * 8 + [2, 4]),
    # one slow cycle is outweighed by the winning ones before it; after the second the draft waits,
    # then is asked for half as many
    ([PLAIN] + [CHEAP_WIN] * 3 + [(0.1, 0, 3.0), (0.1, 0, 10.0)] + [PLAIN] * 4 + [CHEAP_WIN],
     [0, 2, 4, 8, 16, 20, 0, 0, 0, 0, 10]),
    # a draft token that takes as long as a plain step can never pay: never asked again
    ([PLAIN, (1.0, 1, 1.0)] + [CHEAP_WIN] * 3, [0, 2, 0, 0, 0]),
    # proposing nothing (lookup without a match) is not judged: asked again at once
    ([PLAIN, (None, 0, 1.0), CHEAP_WIN], [0, 2, 2]),
])
def test_adaptive_schedule_asks_the_draft_only_while_it_pays(cycles, asked):
    assert _cycles(sp.AdaptiveSchedule(max_tokens=20), cycles) == asked


def test_adaptive_schedule_judges_by_the_realised_rate_not_acceptance():
    """Half the tokens accepted is still faster than plain when drafting is cheap enough."""
    schedule = sp.AdaptiveSchedule(max_tokens=8)
    assert _cycles(schedule, [PLAIN] + [(0.1, 0.5, 1.2)] * 5) == [0, 2, 4, 8, 8, 8]
    assert schedule.draft_token_s == pytest.approx(0.1) and not schedule.hopeless


@pytest.mark.parametrize("room,asked", [(100, [2]), (10, [0])])
def test_adaptive_schedule_reads_a_new_prompt_only_if_the_tokens_left_repay_it(room, asked):
    """A draft that saved 0.5 s per token so far (1 s plain, 2 tokens per 1 s cycle) and reads at
    0.01 s per token: a prompt of 600 tokens (6 s) is worth reading for 100 tokens, not for 10."""
    schedule = sp.AdaptiveSchedule(max_tokens=2)
    _cycles(schedule, [PLAIN, (0.1, 0.5, 0.8)], unread=2, catch_up_token_s=0.01)
    assert schedule.catch_up_token_s == pytest.approx(0.01)
    assert _cycles(schedule, [(0.1, 0.5, 0.8)], room=room, unread=600, catch_up_token_s=0.01) == asked


def test_constant_schedule_is_transformers_and_zero_is_plain():
    assert _cycles(sp.ConstantSchedule(5), [CHEAP_LOSS] * 3) == [5, 5, 5]
    assert _cycles(sp.AdaptiveSchedule(max_tokens=0), [PLAIN, CHEAP_WIN]) == [0, 0]


class _Scripted(sp.ConstantSchedule):
    def __init__(self, script):
        super().__init__()
        self.script = list(script)

    def tokens(self, room, unread):
        return self.script.pop(0) if self.script else 3


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_steps_a_schedule_chooses_are_counted_and_exact(arch, tmp_path):
    target = tiny_model(arch)
    reference, _ = sp.greedy_reference(target, _prompt(), N_NEW)
    _stream(target, tmp_path)
    drafter = sp.ModelDrafter(tiny_model(arch, seed=7), confidence=None)
    out = sp.speculative_decode(target, _prompt(), N_NEW, drafter, schedule=_Scripted([0, 2, 0, 0, 1]))
    assert torch.equal(out.tokens, reference)
    assert out.plain_steps == 3


# ---------------------------------------------------------------- self draft: substitutes

@pytest.fixture
def self_draft(tmp_path):
    target = tiny_model("qwen2", torch.bfloat16)
    ctl = _stream(target, tmp_path, "map")
    return target, ctl, sp.build_substitutes(ctl, "nf4", tmp_path / "drafts", progress=False)


def test_self_draft_shares_the_resident_modules_and_counts_only_its_substitutes(self_draft):
    from bitsandbytes.nn import Linear4bit
    target, ctl, substitutes = self_draft
    drafter = sp.SelfDrafter(target, substitutes, ctl.offloaded_layers)
    assert drafter.model is target
    assert sorted(substitutes) == ctl.computed_layers == [2, 4]
    target_storages = {osk._storage_key(t) for t in osk.module_tensors(target)}
    assert not target_storages & {osk._storage_key(t) for m in substitutes.values() for t in osk.module_tensors(m)}
    assert drafter.resident_bytes == sp.substitute_bytes(substitutes)
    for module in substitutes.values():
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(isinstance(m, Linear4bit) for m in linears)
    # while drafting, the layer list holds the substitutes; after it, the stubs again
    layers = osk.find_decoder_layers(target)
    with drafter._context():
        assert layers[2] is substitutes[2] and layers[4] is substitutes[4]
    assert isinstance(layers[2], osk.OffloadedLayer)


def test_substitutes_keep_the_layers_other_tensors_and_a_bf16_target_saves_two_thirds(self_draft):
    from bitsandbytes.nn import Linear4bit
    target, ctl, substitutes = self_draft
    for i in substitutes:
        stored, refs = osk.layer_tensor_refs(ctl.layer_copy(i)), osk.layer_tensor_refs(substitutes[i])
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.bias"):
            assert torch.equal(refs[name].get(), stored[name].get()), (i, name)
    # 4 bits per weight exactly; beside them each linear carries code tables of a fixed size
    # (the NF4 code, and on the unpacked CPU path the nested absmax's 256-entry code), which a
    # layer of this tiny size cannot amortise: they are left out of the two-thirds.
    tables = 0
    for module in substitutes.values():
        for linear in (m for m in module.modules() if isinstance(m, Linear4bit)):
            assert linear.weight.data.numel() * linear.weight.data.element_size() == linear.weight.quant_state.shape.numel() // 2
            state = linear.weight.quant_state
            tables += sum(t.numel() * t.element_size() for t in (state.code, getattr(state.state2, "code", None))
                          if t is not None)
    assert sp.substitute_bytes(substitutes) - tables <= 0.35 * sum(ctl.layer_bytes[i] for i in substitutes)


def test_the_self_draft_never_reaches_a_layer_file(self_draft, monkeypatch):
    target, ctl, substitutes = self_draft
    drafter = sp.SelfDrafter(target, substitutes, ctl.offloaded_layers)

    def forbidden(*args, **kwargs):
        raise AssertionError("the draft reached an offloaded layer")
    monkeypatch.setattr(osk.OffloadController, "_acquire", forbidden)
    monkeypatch.setattr(osk.LayerStore, "read_into", forbidden)
    monkeypatch.setattr(osk.LayerMaps, "acquire", forbidden)
    assert len(drafter.propose(_prompt(), 4)) >= 1


def test_self_draft_output_is_the_targets_own(self_draft):
    target, ctl, substitutes = self_draft
    prompt = _prompt()
    with ctl.unpatched():
        reference, gaps = sp.greedy_reference(target, prompt, N_NEW)
    out = sp.speculative_decode(target, prompt, N_NEW, sp.SelfDrafter(target, substitutes, ctl.offloaded_layers))
    diff = sp.first_difference(out.tokens, reference)
    # bf16: a verify over several positions rounds differently; a flip only where the top two nearly tie
    assert diff is None or gaps[diff] < 0.25, (diff, gaps)
    assert out.accepted > 0


def test_a_partial_self_draft_skips_the_layers_without_substitutes(self_draft, tmp_path):
    target, ctl, _ = self_draft
    substitutes = sp.build_substitutes(ctl, "nf4", tmp_path / "drafts", layers=[4], progress=False)
    drafter = sp.SelfDrafter(target, substitutes, ctl.offloaded_layers)
    with drafter._context():
        assert isinstance(osk.find_decoder_layers(target)[2], sp.SkippedLayer)
    assert drafter.propose(_prompt(), 3)


def test_stored_substitutes_are_reused_and_checked(self_draft, tmp_path, monkeypatch):
    target, ctl, substitutes = self_draft
    monkeypatch.setattr(sp, "_quantize_nf4", lambda *a: pytest.fail("stored substitutes were quantised again"))
    again = sp.build_substitutes(ctl, "nf4", tmp_path / "drafts", progress=False)
    for i in substitutes:
        for name, ref in osk.layer_tensor_refs(substitutes[i]).items():
            assert torch.equal(ref.get(), osk.layer_tensor_refs(again[i])[name].get()), name
    path = sp.substitute_store(ctl, "nf4", tmp_path / "drafts").path(4)
    data = path.read_bytes()
    path.write_bytes(data[:-9])
    with pytest.raises(CacheError, match=f"{path}.*truncated"):
        sp.build_substitutes(ctl, "nf4", tmp_path / "drafts", progress=False)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CacheError, match=f"{path}.*corrupt"):
        sp.build_substitutes(ctl, "nf4", tmp_path / "drafts", progress=False)


@pytest.mark.parametrize("bad,message", [
    (dict(kind="int3"), "unknown substitute kind 'int3'"),
    (dict(layers=[3]), r"layers \[3\] are not offloaded"),
])
def test_substitute_arguments_are_checked(bad, message, tmp_path):
    ctl = _stream(tiny_model("llama"), tmp_path)
    args = dict(kind="nf4", layers=None) | bad
    with pytest.raises(ValueError, match=message):
        sp.build_substitutes(ctl, args["kind"], tmp_path / "drafts", layers=args["layers"], progress=False)


def test_an_nf4_target_gets_no_nf4_substitutes(tmp_path):
    ctl = _stream(make_model("nf4-dequant", tmp_path), tmp_path)
    with pytest.raises(ValueError, match="NF4 would save nothing"):
        sp.build_substitutes(ctl, "nf4", tmp_path / "drafts", progress=False)


# ---------------------------------------------------------------- below 4 bits: HQQ substitutes

@pytest.mark.parametrize("target", ["bf16", "nf4-dequant"])
@pytest.mark.parametrize("kind", ["hqq3", "hqq2"])
def test_hqq_substitutes_draft_for_any_target_and_are_stored(target, kind, tmp_path, monkeypatch):
    pytest.importorskip("hqq")
    model = tiny_model("qwen2", torch.bfloat16) if target == "bf16" else make_model(target, tmp_path)
    prompt = _prompt()
    reference, gaps = sp.greedy_reference(model, prompt, N_NEW)
    ctl = _stream(model, tmp_path, "map")
    substitutes = sp.build_substitutes(ctl, kind, tmp_path / "drafts", progress=False)
    assert sp.substitute_bytes(substitutes) < sum(ctl.layer_bytes[i] for i in substitutes)
    out = sp.speculative_decode(model, prompt, N_NEW, sp.SelfDrafter(model, substitutes, ctl.offloaded_layers))
    diff = sp.first_difference(out.tokens, reference)
    assert diff is None or gaps[diff] < 0.25, (diff, gaps)
    monkeypatch.setattr(sp, "_quantize_hqq", lambda bits: pytest.fail("stored substitutes were quantised again"))
    again = sp.build_substitutes(ctl, kind, tmp_path / "drafts", progress=False)
    layer = again[2].get_submodule("mlp.down_proj")
    assert torch.equal(layer.W_q, substitutes[2].get_submodule("mlp.down_proj").W_q)
    assert layer.meta["nbits"] == int(kind[-1])


def test_a_stored_hqq_dtype_is_looked_up_never_evaluated():
    pytest.importorskip("hqq")
    name = torch.tensor([ord(c) for c in "torch.bfloat16"], dtype=torch.uint8)
    assert sp._hqq_value("compute_dtype", name) is torch.bfloat16
    code = torch.tensor([ord(c) for c in "__import__('os')"], dtype=torch.uint8)
    with pytest.raises(ValueError, match="stored HQQ dtype \"__import__\\('os'\\)\" is not one this repo writes"):
        sp._hqq_value("compute_dtype", code)
