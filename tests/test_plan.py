"""offload_skip.plan: the step-time model, the placements, what a plan chooses and that the
model it patches is the original one (torch.equal), on every device present."""
import pytest
import torch
from conftest import CUDA, NF4_KINDS, greedy, logits, make_model, tiny_model, with_devices

import offload_skip as osk

# no I/O: the rates a test hands the planner; only the relative sizes matter
RATES = osk.Rates(layer_compute_s=1e-3, fixed_compute_s=1e-3, read_Bps=1e8, read_compute_share=1.0, source="test")


# --------------------------------------------------------------------------- the step-time model

@pytest.mark.parametrize("compute, fixed, reads, depth, share, expected", [
    ([1, 1, 1, 1], 0.5, {}, 0, 0.0, 4.5),                      # nothing streams: compute alone
    ([1, 1, 1, 1], 0.5, {1: 2, 3: 2}, 0, 0.0, 8.5),            # no read-ahead: every read adds
    ([1, 1, 1, 1], 0.5, {1: 1, 3: 1}, 1, 0.0, 4.5),            # read ahead on a copy engine: hidden
    ([1, 1, 1, 1], 0.5, {1: 1, 3: 1}, 1, 1.0, 6.0),            # a CPU's copy takes its cores: not hidden
    ([1] * 4, 0.5, {0: 3, 1: 3, 2: 3, 3: 3}, 2, 0.0, 12.0),    # reads slower than compute: reads set the pace
    ([1] * 6, 0.0, {0: 2, 1: 2, 2: 2}, 1, 0.0, 7.0),           # clustered first: one read each waits
    ([1] * 6, 0.0, {3: 2, 4: 2, 5: 2}, 1, 0.0, 7.0),           # clustered last: the same
    ([1] * 6, 0.0, {1: 2, 3: 2, 5: 2}, 1, 0.0, 6.0),           # interleaved: each read under a resident layer
    ([1] * 6, 0.0, {0: 2, 1: 2, 2: 2}, 2, 0.0, 6.0),           # or one slot more
])
def test_stream_step_s(compute, fixed, reads, depth, share, expected):
    assert osk.stream_step_s(compute, fixed, reads, depth, share) == pytest.approx(expected)


@pytest.mark.parametrize("n_layers, n, placement, expected", [
    (8, 3, "first-fit", (5, 6, 7)),
    (8, 3, "last", (0, 1, 2)),
    (8, 3, "interleaved", (1, 4, 6)),
    (8, 4, "interleaved", (1, 3, 5, 7)),
    (8, 8, "interleaved", tuple(range(8))),
    (8, 0, "interleaved", ()),
])
def test_placement_streamed(n_layers, n, placement, expected):
    assert osk.placement_streamed(n_layers, n, placement) == expected


def _shape(n_layers=6, layer=100, embedding=50, head=50, tied=False, kv_per_token=1):
    return osk.ModelBytes((layer,) * n_layers, embedding, 0 if tied else head, 10, tied, kv_per_token)


# --------------------------------------------------------------------------- what a plan chooses

def test_everything_fits_nothing_streams():
    plan = osk.plan(_shape(), 10_000, rates=RATES, context_tokens=10)
    assert plan.streamed == () and plan.resident == tuple(range(6))
    assert plan.chosen.device_bytes == 6 * 100 + 50 + 50 + 10 + 10


@pytest.mark.parametrize("budget", [300, 400, 500, 600])
def test_a_plan_fits_its_budget_with_the_fewest_streamed_layers(budget):
    shape = _shape()
    plan = osk.plan(shape, budget, rates=RATES, context_tokens=10)
    assert plan.chosen.device_bytes <= budget
    assert plan.chosen.offload_embeddings  # the embedding leaves first: a few rows a token
    # one layer fewer streamed does not fit at this depth
    fewer = osk.candidate(shape, RATES, plan.streamed[1:], plan.chosen.prefetch, plan.chosen.cpu_read, True, 10)
    assert fewer.device_bytes > budget


def test_a_tied_embedding_stays():
    plan = osk.plan(_shape(tied=True), 500, rates=RATES, context_tokens=10)
    assert not plan.chosen.offload_embeddings and plan.chosen.device_bytes <= 500


def test_a_cpu_plan_that_streams_copies():
    # a mapped layer stays mapped until standby(), and the controller counts it: no saving
    plan = osk.plan(_shape(), 400, rates=RATES, context_tokens=10, device="cpu")
    assert plan.streamed and plan.chosen.cpu_read == "copy"
    assert plan.config().cpu_read == "copy" and plan.config().runs == "sequential"


def test_a_gpu_plan_interleaves_when_reads_outlast_compute():
    gpu = osk.Rates(layer_compute_s=1.0, fixed_compute_s=0.0, read_Bps=50.0, read_compute_share=0.0)  # 2 s a layer
    plan = osk.plan(_shape(), 570, rates=gpu, context_tokens=10, device="cuda", prefetch_depths=(1,))
    assert plan.streamed == (1, 3, 5) and plan.chosen.placement == "interleaved"
    assert plan.chosen.step_s == pytest.approx(6.0)


def test_nothing_fits_says_what_the_least_needs():
    with pytest.raises(ValueError, match=r"nothing fits 100 bytes: streaming every layer still needs 170 "
                                         r"\(weights 160, KV cache 10 for 10 tokens x 1\)"):
        osk.plan(_shape(), 100, rates=RATES, context_tokens=10)


def test_a_plan_prints_as_a_table_and_records_in_one_line():
    plan = osk.plan(_shape(), 400, rates=RATES, context_tokens=10)
    text = str(plan)
    for part in ("resident layers", "streamed layers", "input embedding", "output head", "KV cache", "predicted"):
        assert part in text
    assert plan.record() == (f"streamed={osk._ranges(plan.streamed)} placement={plan.chosen.placement} "
                             f"prefetch={plan.chosen.prefetch} cpu_read=copy embedding=disk")


@pytest.mark.parametrize("indices, text", [((), ""), ((3,), "3"), ((1, 2, 3, 7), "1-3,7"), ((0, 2, 4), "0,2,4")])
def test_ranges(indices, text):
    assert osk._ranges(indices) == text


# --------------------------------------------------------------------------- the config it runs

@pytest.mark.parametrize("fields, message", [
    (dict(keep=(1,)), "keep names the layers a stream keeps"),
    (dict(mode="stream", keep=(1,), budget_bytes=10), "keep names the layers a stream keeps"),
    (dict(runs="serial"), "runs must be 'parallel' or 'sequential'"),
    (dict(runs="sequential", inject_distance=2), "pick one"),
])
def test_config_rejects(fields, message):
    with pytest.raises(ValueError, match=message):
        osk.OffloadConfig(**fields)


def test_keep_names_offloaded_layers_only(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"keep names layers that are not offloaded: \[5\]"):
        osk.patch_model(model, [2, 4], tmp_path, mode="stream", keep=(5,), progress=False)


def test_sequential_runs_are_the_original_model_and_parallel_ones_are_not(tmp_path, prompt_ids):
    model = tiny_model("llama")
    reference = logits(model, prompt_ids)
    ctl = osk.patch_model(model, "2-5", tmp_path, mode="stream", prefetch=0, runs="sequential", progress=False)
    assert torch.equal(logits(model, prompt_ids), reference)
    ctl.unpatch()
    osk.patch_model(model, "2-5", tmp_path, mode="stream", prefetch=0, progress=False)  # the original's method
    assert not torch.equal(logits(model, prompt_ids), reference)


# --------------------------------------------------------------------------- the plan's model is the original

PLAN_KINDS = ["llama-fp32", "qwen2-bf16", "gemma3-fp32", *NF4_KINDS]


@pytest.mark.parametrize("share", [0.5, 0.8])
@pytest.mark.parametrize("kind, device", with_devices(PLAN_KINDS))
def test_a_planned_model_equals_the_original(kind, device, share, tmp_path, prompt_ids):
    model = make_model(kind, tmp_path, device)
    ids = prompt_ids.to(device)
    reference, tokens = logits(model, ids), greedy(model, ids, 6)
    shape = osk.ModelBytes.of(model, device)
    total = sum(shape.layer_bytes) + shape.embedding_bytes + shape.head_bytes + shape.other_bytes
    plan = osk.plan(shape, int(share * total), rates=RATES, context_tokens=ids.shape[1] + 6, device=device)
    assert plan.streamed
    ctl = osk.patch_model(model, plan, tmp_path / "layers", progress=False)
    ctl.reset_stats()
    assert torch.equal(logits(model, ids), reference)
    assert torch.equal(greedy(model, ids, 6), tokens)
    # what the plan counted is what the controller counts
    assert ctl.stats()["peak_resident_bytes"] == plan.chosen.weights_bytes
    assert ctl.keep == set(plan.resident)


@pytest.mark.parametrize("kind, device", with_devices(["llama-fp32", "nf4-dequant"]))
def test_replanning_keeps_the_files_and_the_model(kind, device, tmp_path, prompt_ids):
    """unpatch(restore=False) leaves the layers empty and their files kept, for another config:
    the whole model never comes back to the device between them."""
    model = make_model(kind, tmp_path, device)
    ids = prompt_ids.to(device)
    reference = logits(model, ids)
    n = len(osk.find_decoder_layers(model))
    ctl = osk.patch_model(model, list(range(n)), tmp_path / "layers", mode="stream", keep=(), runs="sequential",
                          prefetch=0, cpu_read="copy", progress=False)
    for keep, prefetch in (((0, 1, 2), 1), ((), 2), (tuple(range(1, n, 2)), 0)):
        ctl.standby()
        standby = ctl.resident_bytes()
        ctl.unpatch(restore=False)
        assert osk.tensor_bytes(osk.module_tensors(model), device) == standby  # nothing read back
        ctl = osk.patch_model(model, list(range(n)), tmp_path / "layers", store=ctl.store, mode="stream", keep=keep,
                              runs="sequential", prefetch=prefetch, cpu_read="copy", progress=False)
        assert torch.equal(logits(model, ids), reference)
    ctl.unpatch()
    assert torch.equal(logits(model, ids), reference)


def test_model_bytes_counts_as_the_controller_does(tmp_path):
    model = tiny_model("qwen2")
    shape = osk.ModelBytes.of(model, "cpu")
    layers = osk.find_decoder_layers(model)
    ctl = osk.patch_model(model, list(range(len(layers))), tmp_path, mode="stream", progress=False)
    assert shape.layer_bytes == tuple(ctl.layer_bytes[i] for i in range(len(layers)))  # their files' data sections
    ctl.unpatch()
    parts = osk.weight_breakdown(model, "cpu")
    assert (shape.embedding_bytes, shape.head_bytes, shape.other_bytes) == (
        parts["embedding_bytes"], parts["head_bytes"], parts["other_bytes"])  # qwen2's embedding: its matrix only
    config = model.config  # 8 layers x K and V x 2 KV heads x 16 x 4 bytes
    assert shape.kv_bytes_per_token == 8 * 2 * config.num_key_value_heads * 16 * 4


# --------------------------------------------------------------------------- compute where the bytes are

def test_host_compute_is_weighed_on_a_gpu_only_when_allowed():
    # reads at 1 s a layer against 0.3 s of host compute: computing on the host wins, when allowed
    gpu = osk.Rates(layer_compute_s=0.1, fixed_compute_s=0.0, read_Bps=100.0, read_compute_share=0.0,
                    host_layer_compute_s=0.3)
    shape = _shape()
    assert not osk.plan(shape, 400, rates=gpu, context_tokens=10, device="cuda").chosen.host_compute
    plan = osk.plan(shape, 400, rates=gpu, context_tokens=10, device="cuda", allow_host_compute=True)
    assert plan.chosen.host_compute and plan.config().host_compute == plan.streamed
    assert plan.record().startswith("host=")
    # no slots on the device, and the host layers' share of the KV cache stays on the host
    n = len(plan.streamed)
    assert plan.chosen.weights_bytes == 50 + 10 + 100 * (6 - n)
    assert plan.chosen.kv_bytes == 10 * (6 - n) // 6
    # a CPU has no host to move to: never weighed there
    assert not osk.plan(shape, 400, rates=gpu, context_tokens=10, device="cpu",
                        allow_host_compute=True).chosen.host_compute


# --------------------------------------------------------------------------- drafts

# reads of 1 s a layer against 0.1 s of compute on a GPU: the streamed layers set the pace
SLOW_READS = osk.Rates(layer_compute_s=0.1, fixed_compute_s=0.0, read_Bps=100.0, read_compute_share=0.0)


@pytest.mark.parametrize("draft, budget, drafts, why", [
    # three tokens a verify for 0.05 s of drafting: it pays while reads dominate
    (osk.DraftRates("lookup", tokens_per_verify=3.0, draft_s_per_verify=0.05), 400, True, "pays"),
    # one token a verify: drafting only costs
    (osk.DraftRates("lookup", tokens_per_verify=1.0, draft_s_per_verify=0.05), 400, False, "yields nothing"),
    # a draft model too large to fit beside the fewest streamed layers
    (osk.DraftRates("model", tokens_per_verify=3.0, draft_s_per_verify=0.05, resident_bytes=10_000), 400, False,
     "does not fit"),
    # within PLAN_TOLERANCE of plain decoding: the plan does not draft
    (osk.DraftRates("lookup", tokens_per_verify=1.0, draft_s_per_verify=0.0), 400, False, "ties"),
])
def test_a_plan_drafts_where_the_draft_pays_and_fits(draft, budget, drafts, why):
    plan = osk.plan(_shape(), budget, rates=SLOW_READS, context_tokens=10, device="cuda", drafts=(draft,))
    assert bool(plan.draft) == drafts, why
    assert plan.chosen.device_bytes <= budget
    if drafts:
        plain = min((c for c in plan.candidates if not c.draft and c.device_bytes <= budget), key=lambda c: c.step_s)
        assert plan.chosen.step_s == pytest.approx(draft.token_s(plain.step_s))
        assert plan.record().endswith(f" draft={draft.kind}") and "draft" in str(plan)


def test_a_drafts_bytes_compete_with_resident_layers():
    # a 100-byte draft model and its KV cache: one more layer streams than without it
    draft = osk.DraftRates("model", tokens_per_verify=3.0, draft_s_per_verify=0.05, resident_bytes=100,
                           kv_bytes_per_token=1)
    plan = osk.plan(_shape(), 500, rates=SLOW_READS, context_tokens=10, device="cuda", drafts=(draft,))
    plain = osk.plan(_shape(), 500, rates=SLOW_READS, context_tokens=10, device="cuda")
    assert plan.draft == "model" and plan.chosen.draft_bytes == 100 + 10
    assert len(plan.streamed) == len(plain.streamed) + 1


def test_a_self_drafts_bytes_grow_with_what_streams_and_need_a_streamed_layer():
    draft = osk.DraftRates("self:nf4", tokens_per_verify=1.5, draft_s_per_verify=0.5, substitute_share=0.25)
    assert draft.device_bytes(_shape(), (1, 3), 10) == 50
    plan = osk.plan(_shape(), 10_000, rates=SLOW_READS, context_tokens=10, device="cuda", drafts=(draft,))
    assert plan.streamed == () and not plan.draft  # everything fits, and streaming to draft would not pay
    assert all(c.streamed for c in plan.candidates if c.draft)  # a self draft of nothing streamed: not weighed


def test_a_batch_is_not_drafted():
    draft = osk.DraftRates("lookup", tokens_per_verify=3.0, draft_s_per_verify=0.05)
    plan = osk.plan(_shape(), 400, rates=SLOW_READS, context_tokens=10, batch_size=2, device="cuda",
                    drafts=(draft,))
    assert not any(c.draft for c in plan.candidates)


def test_host_compute_on_a_cpu_is_the_identity(tmp_path, prompt_ids):
    model = tiny_model("llama")
    reference = logits(model, prompt_ids)
    ctl = osk.patch_model(model, [2, 4], tmp_path, mode="stream", prefetch=0, host_compute=(2, 4), progress=False)
    assert ctl.host_layers == set() and torch.equal(logits(model, prompt_ids), reference)
    assert ctl.host_bytes() == 0


def test_host_compute_names_computed_offloaded_layers(tmp_path):
    with pytest.raises(ValueError, match=r"host_compute names layers that are not offloaded and computed: \[3\]"):
        osk.patch_model(tiny_model("llama"), [2, 4], tmp_path, mode="stream", host_compute=(3,), progress=False)


@pytest.mark.parametrize("kind", [pytest.param("llama-fp32", marks=CUDA), pytest.param("qwen2-bf16", marks=CUDA)])
def test_host_compute_on_cuda_is_close_and_holds_less(kind, tmp_path, prompt_ids):
    """The layers compute on the CPU from host memory: close to the GPU's result (not equal:
    other kernels), no device bytes for them, and their KV cache on the host."""
    model = make_model(kind, tmp_path, "cuda")
    ids = prompt_ids.to("cuda")
    reference = logits(model, ids)
    streamed = osk.patch_model(model, [2, 4], tmp_path / "a", mode="stream", prefetch=0, progress=False)
    streamed.reset_stats()
    logits(model, ids)
    slots = streamed.stats()["peak_resident_bytes"]
    streamed.unpatch()
    ctl = osk.patch_model(model, [2, 4], tmp_path / "b", mode="stream", prefetch=0, host_compute=(2, 4),
                          progress=False)
    ctl.reset_stats()
    out = logits(model, ids)
    tolerance = 1e-3 if kind.endswith("fp32") else 5e-2
    assert torch.allclose(out, reference, atol=tolerance, rtol=tolerance)
    assert ctl.stats()["peak_resident_bytes"] < slots and ctl.host_bytes() == sum(ctl.layer_bytes.values())
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert cache.layers[2].keys.device.type == "cpu" and cache.layers[3].keys.device.type == "cuda"


@pytest.mark.parametrize("kind", [pytest.param("nf4", marks=CUDA)])
def test_host_compute_refuses_nf4_on_cuda(kind, tmp_path):
    model = make_model(kind, tmp_path, "cuda")
    with pytest.raises(ValueError, match="bitsandbytes 4-bit"):
        osk.patch_model(model, [2, 4], tmp_path / "l", mode="stream", host_compute=(2,), progress=False)
