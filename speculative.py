"""Greedy speculative decoding, written for a target whose layers stream from disk.

Stream residency reads every streamed layer once per target forward. Plain decoding runs one
forward per generated token; here a cheap draft proposes up to k tokens, the target verifies
them all in one forward (its greedy token at each position), keeps the longest agreeing prefix
and adds its own token after it. So one read of the streamed layers serves every accepted
token, and the output is the target's greedy output: up to rounding, because a verify forward
over k + 1 positions sums in another order than k + 1 one-token forwards (fp32: tiny; bf16 and
NF4: a flip is possible where the target's top two logits nearly tie; `greedy_reference` gives
those gaps so a difference can be shown, never hidden).

Drafts (each only proposes; none ever touches a streamed layer or its file while decoding):
- ``ModelDrafter``: any causal LM with the target's tokenizer, resident, its own KV cache;
- ``SelfDrafter`` (SubSpec's idea, arXiv 2509.18344): the target itself, its resident modules
  shared (the same objects), each streamed layer replaced by a resident low-bit substitute
  (``build_substitutes``, stored and validated like the layer files) or skipped;
- ``LookupDrafter``: prompt lookup, the tokens that followed the last n-gram's previous
  occurrence; no weights.

How many tokens a verify asks for is a schedule's choice. ``ConstantSchedule`` is transformers'
own for assisted decoding: up to 20 draft tokens per verify, a model draft stopping early once
its top token's probability falls below 0.4. ``AdaptiveSchedule`` asks the draft only while
drafting pays, judged from the run's own timings: on a CPU the draft computes on the target's
cores, and a draft whose tokens cost more than its accepted tokens save makes decoding slower
than plain; this schedule then decodes plainly (its rows count those verifies).

    ctl = offload_skip.patch_model(target, "even", "cache", mode="stream")
    drafter = SelfDrafter(target, build_substitutes(ctl, "nf4", "cache"), ctl.offloaded_layers)
    out = speculative_decode(target, input_ids, 64, drafter)   # out.tokens, out.target_forwards
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import offload_skip
from offload_skip import LayerStore, find_decoder_layers, layer_tensor_refs, tensor_bytes

DEFAULT_DRAFT_TOKENS = 20   # transformers' num_assistant_tokens
DEFAULT_CONFIDENCE = 0.4    # transformers' assistant_confidence_threshold
LOOKUP_NGRAM = 2            # transformers' max_matching_ngram_size
LOOKUP_TOKENS = 10          # the prompt_lookup_num_tokens transformers' docs use


# --------------------------------------------------------------------------- model calls

@functools.lru_cache(maxsize=None)
def _forward_parameters(model_class: type) -> frozenset[str]:
    # once per class: a draft calls forward once per token, and inspect.signature is not free
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_keyword(model) -> str:
    """The KV cache's forward keyword: transformers renamed `past_key_values` to `cache` (with a
    deprecation warning for the old name); older 5.x releases know only the old one."""
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def last_logits_only(model) -> dict:
    """lm_head over every prompt position is wasted work when only the next token matters."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(type(model)) else {}


def _forward(model, ids: torch.Tensor, cache, last_only: bool):
    keyword = cache_keyword(model)
    kwargs = last_logits_only(model) if last_only else {}
    out = model(input_ids=ids, **({keyword: cache} if cache is not None else {}), use_cache=True, **kwargs)
    new_cache = getattr(out, keyword)
    if cache is None and hasattr(new_cache, "activate_past_recording"):
        # a sliding-window layer otherwise forgets what falls out of its window at once, and a
        # rejected draft could not be rolled back (transformers' assisted decoding does the same,
        # after the prefill: the prompt's own states are not recorded twice)
        new_cache.activate_past_recording()
    return out.logits, new_cache


def _crop(cache, tokens: int) -> None:
    """Drop the last `tokens` positions; also with 0, which lets a recording sliding-window
    layer trim itself back to its window."""
    cache.crop(-tokens)


# --------------------------------------------------------------------------- drafts

class Drafter:
    """Proposes continuations of a sequence. resident_bytes: memory the draft adds to the
    target's (its weights; its KV cache apart)."""
    name = "none"
    resident_bytes = 0

    def start(self) -> None:
        """A new sequence begins: forget what the previous one cached."""

    def unread(self, sequence: torch.Tensor) -> int:
        """Tokens of `sequence` ([1, n]) before its last that the draft has not read: none here."""
        return 0

    def catch_up(self, sequence: torch.Tensor) -> int:
        """Read what the draft has not yet read of `sequence` but its last token, apart from a
        proposal, so that a proposal's time is the cost of drafting alone; returns how many."""
        return 0

    def propose(self, sequence: torch.Tensor, max_tokens: int) -> list[int]:
        """Up to max_tokens token ids to follow `sequence` ([1, n]); none here: plain decoding."""
        return []


class LookupDrafter(Drafter):
    """Prompt lookup (transformers' prompt_lookup_num_tokens): find the latest earlier
    occurrence of the sequence's last n tokens (n from `ngram` down to 1) and propose what
    followed it. Free to run; proposes nothing where nothing repeats."""
    name = "lookup"

    def __init__(self, ngram: int = LOOKUP_NGRAM, max_tokens: int = LOOKUP_TOKENS):
        self.ngram, self.max_tokens = ngram, max_tokens

    def propose(self, sequence: torch.Tensor, max_tokens: int) -> list[int]:
        ids = sequence[0]
        n_ids = len(ids)
        limit = min(max_tokens, self.max_tokens)
        for n in range(min(self.ngram, n_ids - 1), 0, -1):
            windows = ids.unfold(0, n, 1)[:-1]  # every earlier n-gram (not the last one itself)
            hits = (windows == ids[-n:]).all(dim=1).nonzero().flatten()
            for start in reversed(hits.tolist()):
                follow = ids[start + n:start + n + limit]
                if len(follow):
                    return follow.tolist()
        return []


class ModelDrafter(Drafter):
    """A causal LM that drafts greedily from its own KV cache. Between proposals it keeps what
    it cached of the sequence up to the first token that differs (a rejected draft token), so
    each proposal feeds it only the new tokens."""

    def __init__(self, model: nn.Module, name: str = "model", confidence: float | None = DEFAULT_CONFIDENCE):
        self.model, self.name, self.confidence = model, name, confidence
        self.resident_bytes = tensor_bytes(offload_skip.module_tensors(model))
        self.start()

    def start(self) -> None:
        self._cache, self._fed = None, torch.empty(0, dtype=torch.long)

    def _context(self):
        return contextlib.nullcontext()

    def _agree(self, ids: torch.Tensor) -> int:
        """Crop the draft's cache to what it read that `ids` still holds (never the last token:
        its logits are the first draft); returns that length."""
        keep = len(ids) - 1 - self.unread(ids[None])
        if self._cache is not None:
            _crop(self._cache, len(self._fed) - keep)
        self._fed = ids[:keep]
        return keep

    def unread(self, sequence: torch.Tensor) -> int:
        ids, fed = sequence[0].cpu(), self._fed
        n = min(len(fed), len(ids) - 1)
        differ = (fed[:n] != ids[:n]).nonzero()
        return len(ids) - 1 - (int(differ[0]) if len(differ) else n)

    def catch_up(self, sequence: torch.Tensor) -> int:
        # the prompt, or tokens decoded while the draft was not asked; a single unread token
        # rides with the proposal's first forward instead, as it would in any case
        ids = sequence[0].cpu()
        keep = self._agree(ids)
        if len(ids) - 1 - keep <= 1:
            return 0
        with torch.no_grad(), self._context():
            _, self._cache = _forward(self.model, sequence[:, keep:-1], self._cache, last_only=True)
        self._fed = ids[:-1]
        return len(ids) - 1 - keep

    def propose(self, sequence: torch.Tensor, max_tokens: int) -> list[int]:
        ids = sequence[0].cpu()
        keep = self._agree(ids)
        feed = sequence[:, keep:]
        proposal = []
        with torch.no_grad(), self._context():
            for _ in range(max_tokens):
                logits, self._cache = _forward(self.model, feed, self._cache, last_only=True)
                self._fed = torch.cat([self._fed, feed[0].cpu()])
                last = logits[0, -1]
                token = int(last.argmax())
                proposal.append(token)
                if self.confidence and float(torch.softmax(last.float(), -1)[token]) < self.confidence:
                    break
                feed = sequence.new_tensor([[token]])
        return proposal


class SkippedLayer(nn.Module):
    """A decoder layer left out of the draft: its output is its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class SelfDrafter(ModelDrafter):
    """The target drafting for itself: while it drafts, each offloaded layer in the target's
    layer list is replaced by its resident substitute (or skipped where it has none), so the
    draft shares every resident module (same objects) and never reaches a layer file.
    resident_bytes counts the substitutes only: the rest is the target's."""

    def __init__(self, target: nn.Module, substitutes: dict[int, nn.Module], offloaded: list[int],
                 name: str = "self", confidence: float | None = DEFAULT_CONFIDENCE):
        self.model, self.name, self.confidence = target, name, confidence
        self.substitutes = substitutes
        self._draft_layers = {i: substitutes.get(i) or SkippedLayer() for i in offloaded}
        self._layer_list = find_decoder_layers(target)
        self.resident_bytes = substitute_bytes(substitutes)
        self.start()

    @contextlib.contextmanager
    def _context(self):
        originals = {i: self._layer_list[i] for i in self._draft_layers}
        for i, module in self._draft_layers.items():
            self._layer_list[i] = module
        try:
            yield
        finally:
            for i, module in originals.items():
                self._layer_list[i] = module


# --------------------------------------------------------------------------- schedules

@dataclass(frozen=True)
class Cycle:
    """What one verify cycle did, as a schedule sees it."""
    asked: int             # tokens asked of the draft (0: a plain step)
    proposed: int
    emitted: int           # tokens the verify emitted: the accepted ones and the target's own
    catch_up_tokens: int   # tokens the draft read before proposing (the prompt; tokens decoded without it)
    catch_up_s: float
    proposal_s: float
    verify_s: float


class ConstantSchedule:
    """transformers' schedule: ask the draft for up to `max_tokens` at every verify (a model draft
    still stops early below its confidence threshold)."""
    name = "constant"

    def __init__(self, max_tokens: int = DEFAULT_DRAFT_TOKENS):
        if max_tokens < 0:
            raise ValueError(f"draft_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens

    def tokens(self, room: int, unread: int) -> int:
        """How many tokens to ask the draft for before the next verify (0: a plain step), with
        `room` tokens left to decode after it and `unread` tokens the draft would first read."""
        return self.max_tokens

    def record(self, cycle: Cycle) -> None:
        """What the last verify cycle did."""


class AdaptiveSchedule(ConstantSchedule):
    """Asks the draft only while drafting pays, judged from the owner's own cycles (kept across
    prompts for as long as the owner keeps the schedule: one schedule per workload).

    - A plain step's time: the fastest of the latest `PLAIN_WINDOW` one-token verifies (the
      first cycle is one). The fastest, because a verify right after the draft ran is slower
      than plain decoding's back-to-back steps (seen on this project's CPU, where the draft
      evicts the target's data from the caches), and drafting must beat the latter.
    - A draft whose proposed token takes at least a plain step can never pay (a verify emits at
      most proposed + 1 tokens and takes at least a plain step): it is not asked again.
    - After each drafting cycle the draft's rate (tokens emitted over proposal + verify seconds,
      older cycles weighted by `memory` per cycle) is set against a plain step's. If plain is
      faster, the next `retry` cycles are plain steps, a wait that doubles each time the draft
      loses in a row, and the tokens asked are halved.
    - The tokens asked start at 2 (trying a slow draft costs little) and double with each
      winning cycle up to `max_tokens`.
    - Before the draft must catch up with more than a plain step's worth of reading (a new
      prompt), it is asked only if, at its rate so far, the tokens left repay that reading.
    """
    name = "adaptive"
    FIRST_TOKENS = 2
    PLAIN_WINDOW = 8

    def __init__(self, max_tokens: int = DEFAULT_DRAFT_TOKENS, memory: float = 0.7, retry: int = 4):
        super().__init__(max_tokens)
        self.memory, self.first_retry = memory, retry
        self.plain_s: float | None = None           # a plain step: the fastest of the latest one-token verifies
        self._plain_steps_s: list[float] = []
        self.draft_token_s: float | None = None     # proposal seconds per proposed token, decayed
        self.catch_up_token_s: float | None = None  # the draft's reading, seconds per token, decayed
        self.hopeless = False
        self._proposed = (0.0, 0.0)                 # decayed (tokens proposed, proposal seconds)
        self._caught_up = (0.0, 0.0)                # decayed (tokens read, seconds)
        self._drafting = (0.0, 0.0)                 # decayed (tokens emitted, seconds) of drafting cycles
        self.cap, self.retry, self._wait = self.FIRST_TOKENS, retry, 0

    def _decayed(self, pair: tuple[float, float], count: float, seconds: float) -> tuple[float, float]:
        return self.memory * pair[0] + count, self.memory * pair[1] + seconds

    def _repays(self, room: int, unread: int) -> bool:
        if self.catch_up_token_s is None or self._drafting[1] == 0:
            return True  # nothing known yet: find out
        reading_s = unread * self.catch_up_token_s
        if reading_s <= self.plain_s:
            return True
        saved_s = (room + 1) * (self.plain_s - self._drafting[1] / self._drafting[0])
        return saved_s > reading_s

    def tokens(self, room: int, unread: int) -> int:
        if self.max_tokens == 0 or self.hopeless or self.plain_s is None:
            return 0
        if self._wait:
            self._wait -= 1
            return 0
        return min(self.cap, self.max_tokens) if self._repays(room, unread) else 0

    def record(self, cycle: Cycle) -> None:
        if cycle.proposed == 0:  # a one-token verify is a plain step, whoever chose it
            self._plain_steps_s = (self._plain_steps_s + [cycle.verify_s])[-self.PLAIN_WINDOW:]
            self.plain_s = min(self._plain_steps_s)
        if cycle.catch_up_tokens:
            self._caught_up = self._decayed(self._caught_up, cycle.catch_up_tokens, cycle.catch_up_s)
            self.catch_up_token_s = self._caught_up[1] / self._caught_up[0]
        if cycle.asked == 0 or cycle.proposed == 0:  # nothing drafted (lookup without a match): nothing to judge
            return
        self._proposed = self._decayed(self._proposed, cycle.proposed, cycle.proposal_s)
        self.draft_token_s = self._proposed[1] / self._proposed[0]
        if self.draft_token_s >= self.plain_s:
            self.hopeless = True
            return
        self._drafting = self._decayed(self._drafting, cycle.emitted, cycle.proposal_s + cycle.verify_s)
        if self._drafting[0] / self._drafting[1] < 1 / self.plain_s:
            self._wait, self.retry = self.retry, 2 * self.retry
            self.cap = max(self.FIRST_TOKENS, self.cap // 2)
        else:
            self.cap, self.retry = min(2 * self.cap, self.max_tokens), self.first_retry


# --------------------------------------------------------------------------- decoding

@dataclass(frozen=True)
class Decoded:
    tokens: torch.Tensor   # [1, max_new_tokens] new token ids
    target_forwards: int   # prefill included: each reads every streamed layer once
    drafted: int           # draft tokens proposed
    accepted: int          # of those, kept
    prefill_s: float       # the prompt's forward, which gives the first token
    draft_s: float         # time spent proposing, the draft's catching up with the sequence included
    verify_s: float        # time in the verify forwards (prefill apart)
    plain_steps: int       # verifies the schedule ran without asking the draft (it judged drafting slower)


def speculative_decode(target: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, drafter: Drafter,
                       draft_tokens: int = DEFAULT_DRAFT_TOKENS, schedule: ConstantSchedule | None = None) -> Decoded:
    """Exactly max_new_tokens greedy tokens of `target` (EOS ignored, like the plain decode loop),
    verified from `drafter`'s proposals, as many per verify as `schedule` asks (default: a
    ConstantSchedule of `draft_tokens`). Batch 1."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding here is for one sequence, got a batch of {input_ids.shape[0]}")
    schedule = ConstantSchedule(draft_tokens) if schedule is None else schedule
    drafter.start()
    device = input_ids.device
    drafted = accepted = plain_steps = 0
    with torch.no_grad():
        start = time.perf_counter()
        logits, cache = _forward(target, input_ids, None, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
        if device.type == "cuda":  # the timer covers the prompt's forward, not its queueing
            torch.cuda.synchronize(device)
        prefill_s = time.perf_counter() - start
        draft_s = verify_s = 0.0
        forwards, new, sequence = 1, [token], torch.cat([input_ids, token], dim=1)
        while len(new) < max_new_tokens:
            room = max_new_tokens - len(new) - 1  # a verify also emits the target's own next token
            wanted = schedule.tokens(room, drafter.unread(sequence)) if room else 0
            plain_steps += bool(room) and not wanted
            asked = min(wanted, room)
            start = time.perf_counter()
            # the draft reads the prompt only once it is first asked: a schedule may never ask
            caught_up = drafter.catch_up(sequence) if asked else 0
            catch_up_s, start = time.perf_counter() - start, time.perf_counter()
            proposal = drafter.propose(sequence, asked) if asked else []
            cycle_draft_s = time.perf_counter() - start
            start = time.perf_counter()
            block = torch.tensor([[int(sequence[0, -1])] + proposal], dtype=input_ids.dtype, device=device)
            logits, cache = _forward(target, block, cache, last_only=False)
            greedy = logits[0].argmax(-1).tolist()
            cycle_verify_s = time.perf_counter() - start
            kept = 0
            while kept < len(proposal) and proposal[kept] == greedy[kept]:
                kept += 1
            _crop(cache, len(proposal) - kept)  # the cache holds last + proposal: keep last + the agreed ones
            emitted = torch.tensor([proposal[:kept] + [greedy[kept]]], dtype=input_ids.dtype, device=device)
            schedule.record(Cycle(asked, len(proposal), kept + 1, caught_up, catch_up_s, cycle_draft_s,
                                  cycle_verify_s))
            draft_s, verify_s = draft_s + catch_up_s + cycle_draft_s, verify_s + cycle_verify_s
            forwards, drafted, accepted = forwards + 1, drafted + len(proposal), accepted + kept
            new += list(emitted.split(1, dim=1))
            sequence = torch.cat([sequence, emitted], dim=1)
    return Decoded(torch.cat(new, dim=1)[:, :max_new_tokens], forwards, drafted, accepted, prefill_s, draft_s,
                   verify_s, plain_steps)


def greedy_reference(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, list[float]]:
    """(tokens [1, n], top-2 logit gap at each position) of plain greedy decoding, one token per
    forward: what speculative output is compared with, and how near a tie each choice was."""
    gaps, new = [], []
    with torch.no_grad():
        logits, cache = _forward(model, input_ids, None, last_only=True)
        for step in range(max_new_tokens):
            top2 = logits[0, -1].float().topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            token = logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
            if step + 1 < max_new_tokens:
                logits, cache = _forward(model, token, cache, last_only=True)
    return torch.cat(new, dim=1), gaps


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The first position where two [1, n] token tensors differ, or None."""
    differ = (a[0] != b[0]).nonzero()
    return int(differ[0]) if len(differ) else None


# --------------------------------------------------------------------------- substitutes

# nf4: bitsandbytes (the repo's NF4: block 64, nested statistics), for a bf16/fp16/fp32 target.
# hqq3, hqq2: HQQ (Half-Quadratic Quantization, mobiusml/hqq), 3 and 2 bits in groups of 64, its
# scales and zeros in the compute dtype: calibration-free like NF4, maintained, and it goes below
# 4 bits, which an NF4 target needs for a substitute to save anything. On a CPU it computes
# through its PyTorch backend (the weight dequantised at every forward).
SUBSTITUTE_KINDS = ("nf4", "hqq3", "hqq2")
HQQ_GROUP_SIZE = 64


def substitute_bytes(substitutes: dict[int, nn.Module]) -> int:
    """Bytes the substitutes hold, each storage once; HQQ keeps its scales and zeros in a dict."""
    def tensors(module):
        yield from offload_skip.module_tensors(module)
        for mod in module.modules():
            yield from (v for v in (getattr(mod, "meta", None) or {}).values() if isinstance(v, torch.Tensor))
    seen: set = set()
    return sum(tensor_bytes(tensors(m), seen=seen) for m in substitutes.values())


def _linear_names(module: nn.Module) -> list[str]:
    return [name for name, mod in module.named_modules() if type(mod) is nn.Linear]


def _set_submodule(module: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, attr, child)


def _quantize_nf4(layer: nn.Module, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of `layer` with every nn.Linear in bitsandbytes NF4 (block 64, nested
    statistics: the repo's NF4 settings), as bitsandbytes' own state_dict names them, before any
    CPU repacking (that is done after loading, for this machine)."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    for name in _linear_names(layer):
        linear = layer.get_submodule(name)
        q = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
        weight = linear.weight.data
        q.weight = Params4bit(weight.contiguous(), requires_grad=False, blocksize=64, compress_statistics=True,
                              quant_type="nf4", module=q)._quantize(weight.device)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        _set_submodule(layer, name, q)
    return {k: v.contiguous() for k, v in layer.state_dict().items()}


def _nf4_module(skeleton: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device,
                compute_dtype: torch.dtype) -> nn.Module:
    """A substitute made from its stored tensors: each nn.Linear of the skeleton that has a
    stored NF4 weight becomes a Linear4bit over it, every other tensor is bound as stored."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    tensors = dict(tensors)
    for name in _linear_names(skeleton):
        linear = skeleton.get_submodule(name)
        prefix = f"{name}.weight."
        stats = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        q = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = Params4bit.from_prequantized(tensors.pop(f"{name}.weight").to(device), stats,
                                                device=device, module=q)
        if linear.bias is not None:
            q.bias = nn.Parameter(tensors.pop(f"{name}.bias").to(device), requires_grad=False)
        _set_submodule(skeleton, name, q)
    refs = layer_tensor_refs(skeleton)
    for name, tensor in tensors.items():
        refs[name].set(tensor.to(device))
    if device.type == "cpu":
        offload_skip.prepack_nf4_for_cpu(skeleton)
    return skeleton


def _compute_dtype(ctl) -> torch.dtype:
    """What the offloaded layers compute in: their weights' dtype; for 4-bit layers, the dtype of
    their other floating tensors (norms), which is what the hidden states carry."""
    stored = ctl.layer_dtype()
    if stored.is_floating_point:
        return stored
    from bitsandbytes.nn import Linear4bit

    layer = ctl.layer_copy(ctl.offloaded_layers[0], tensors=False)  # placeholders keep the dtypes
    return next((p.dtype for m in layer.modules() if not isinstance(m, Linear4bit)
                 for p in m.parameters(recurse=False) if p.dtype.is_floating_point), torch.bfloat16)


def _dequantized(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`layer` with every bitsandbytes 4-bit linear replaced by a plain nn.Linear of its
    dequantised weight (a skeleton's placeholders stay placeholders): what a lower width is made
    from, and the structure a stored substitute is bound to."""
    from bitsandbytes.nn import Linear4bit

    for name, mod in list(layer.named_modules()):
        if not isinstance(mod, Linear4bit):
            continue
        linear = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta", dtype=dtype)
        weight, state = mod.weight.data, mod.weight.quant_state
        if weight.numel() and state is not None:
            import bitsandbytes.functional as F
            if getattr(state, "packing_format_for_cpu", False):
                weight, state = F._convert_weight_packed_for_cpu_inverse(weight, state)
            linear.weight = nn.Parameter(F.dequantize_4bit(weight, state).to(dtype), requires_grad=False)
        else:
            linear.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=weight.device), requires_grad=False)
        if mod.bias is not None:
            linear.bias = nn.Parameter(mod.bias.data, requires_grad=False)
        _set_submodule(layer, name, linear)
    return layer


def _hqq_config(bits: int) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig
    return BaseQuantizeConfig(nbits=bits, group_size=HQQ_GROUP_SIZE, offload_meta=False)


def _quantize_hqq(bits: int):
    def quantize(layer: nn.Module, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors of `layer` with every nn.Linear in HQQ at `bits`, as HQQ's state_dict names
        them (its scalar settings encoded as small tensors)."""
        from hqq.core.quantize import HQQLinear

        for name in _linear_names(layer):
            linear = layer.get_submodule(name)
            q = HQQLinear(linear, _hqq_config(bits), compute_dtype=compute_dtype, device=str(linear.weight.device))
            _set_submodule(layer, name, q)
        return {k: v.contiguous() for k, v in layer.state_dict().items()}
    return quantize


# HQQ's own loader turns stored strings into dtypes with eval(); a stored file is data, never
# code: here the dtypes come from this table, everything else from the tensors' values.
_HQQ_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int8,
                                   torch.int32)}


def _hqq_value(name: str, tensor: torch.Tensor):
    from hqq.core.quantize import _META_TYPE

    kind = {**_META_TYPE, "stores_quant_config": bool, "offload_meta": bool}.get(name, torch.Tensor)
    if kind is torch.Tensor:
        return tensor
    if kind in (str, torch.dtype):
        text = "".join(map(chr, tensor.tolist()))
        if kind is str:
            return text
        if text not in _HQQ_DTYPES:
            raise ValueError(f"stored HQQ dtype {text!r} is not one this repo writes")
        return _HQQ_DTYPES[text]
    return torch.Size(tensor.tolist()) if kind is torch.Size else kind(tensor.item())


def _hqq_module(skeleton: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device,
                compute_dtype: torch.dtype) -> nn.Module:
    """A substitute made from its stored tensors: each nn.Linear of the skeleton becomes an
    HQQLinear loaded from its entries, every other tensor is bound as stored."""
    from hqq.core.quantize import HQQLinear

    tensors = dict(tensors)
    for name in _linear_names(skeleton):
        prefix = f"{name}."
        state = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        state.pop("encoded_state_dict", None)
        state = {k: v.to(device) if k in ("W_q", "bias", "scale", "zero") else _hqq_value(k, v)
                 for k, v in state.items()}
        q = HQQLinear(None, None, compute_dtype=compute_dtype, device=str(device), initialize=False)
        q.load_state_dict(state)
        _set_submodule(skeleton, name, q)
    refs = layer_tensor_refs(skeleton)
    for name, tensor in tensors.items():
        refs[name].set(tensor.to(device))
    return skeleton


def substitute_store(ctl, kind: str, cache_dir: str | Path) -> LayerStore:
    """Where `kind` substitutes of ctl's layers live: their own fingerprint, made of the target
    layer files' sha256s (a changed layer file means new substitutes) and the method."""
    import importlib.metadata

    source = ctl.store.read_manifest()
    library = "bitsandbytes" if kind == "nf4" else "hqq"
    identity = {"substitute": kind, library: importlib.metadata.version(library),
                "source": ctl.store.identity, "source_sha256": {str(i): source["layers"][str(i)]["sha256"]
                                                                 for i in ctl.offloaded_layers}}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return LayerStore(Path(cache_dir), f"draft-{kind}-{fingerprint}", identity)


def build_substitutes(ctl, kind: str, cache_dir: str | Path, layers: list[int] | None = None,
                      progress: bool = True) -> dict[int, nn.Module]:
    """A resident low-bit copy of each of `layers` (default: every layer ctl streams), built
    from the layer files one at a time and stored like them (safetensors, sha256 manifest,
    atomic); stored ones are reused after their checks. The target stays as it is."""
    if kind not in SUBSTITUTE_KINDS:
        raise ValueError(f"unknown substitute kind {kind!r}; choose from {', '.join(SUBSTITUTE_KINDS)}")
    layers = [i for i in ctl.computed_layers if i not in ctl.keep] if layers is None else list(layers)
    stray = sorted(set(layers) - set(ctl.offloaded_layers))
    if stray:
        raise ValueError(f"layers {stray} are not offloaded: only an offloaded layer gets a substitute")
    dtype = _compute_dtype(ctl)
    if kind == "nf4" and ctl.layer_dtype() not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"an nf4 substitute needs a bf16/fp16/fp32 target, this one stores {ctl.layer_dtype()}: "
                         "NF4 would save nothing over an NF4 layer; use hqq3 or hqq2")
    module = _nf4_module if kind == "nf4" else _hqq_module
    store = substitute_store(ctl, kind, cache_dir)
    if not store.open_existing(layers):
        def quantized():
            quantize = _quantize_nf4 if kind == "nf4" else _quantize_hqq(int(kind[-1]))
            for i in layers:
                yield i, quantize(_dequantized(ctl.layer_copy(i), dtype), dtype)
        store.sync(quantized(), total=len(layers), progress=progress)
    substitutes = {}
    for i in layers:
        flat = torch.empty(store.layouts[i].data_bytes, dtype=torch.uint8)
        store.read_into(i, flat)
        tensors = {k: v.clone() for k, v in store.layouts[i].views(flat).items()}
        substitutes[i] = module(_dequantized(ctl.layer_copy(i, tensors=False), dtype), tensors, ctl.device, dtype)
    store.close()
    return substitutes
