"""A bandwidth model of decode time per token for resident, session and stream residency.

Batch-1 decoding reads every weight once per token. Offloaded layers add a read from
storage and, on a GPU, a host-to-device copy. Without prefetch these add to the compute
time; with prefetch the reader, the copy engine and the compute run as a pipeline, so
the slowest of the three sets the pace:

    resident          t = t_compute
    session           t = t_compute               (+ offloaded_bytes / read rate once per session)
    stream, depth 0   t = t_compute + S / storage + S / h2d
    stream, depth >=1 t = max(t_compute, S / storage, S / h2d)

S = bytes streamed per token (offloaded layers that do not fit the residency budget).
t_compute is measured (the resident model's decode time per token): batch-1 NF4 kernels
are far from the device's memory bandwidth, so bytes / bandwidth would flatter them.

Speculative decoding reads S once per verify forward, which emits accepted_per_verify tokens:

    t = (drafted_per_verify x t_draft + t_verify) / accepted_per_verify

with t_verify one stream-residency forward and the acceptance measured (results/speculative.csv);
its assumptions are listed in one place, the section "speculative decoding".

    python estimate.py                      # Qwen2.5-3B NF4, even layers 2..32, RTX 4050 laptop
    python estimate.py --check results      # predictions next to this machine's measurements
    python estimate.py --speculative results  # + speculative: 3B reference, 7B and 14B on a 6 GB card
    python estimate.py --plan               # + offload_skip.plan for the 3B, 7B and 14B on a 6 GB card

report.py puts both tables into results/README.md.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import bench
from offload_skip import fit_budget, select_layers

GB = 1e9


@dataclass(frozen=True)
class Prediction:
    streamed_bytes: int       # read per token
    resident_s: float         # decode time per token
    session_s: float
    session_load_s: float     # once per session: every offloaded layer read and copied
    stream_serial_s: float    # prefetch 0
    stream_prefetch_s: float  # prefetch >= 1


def transfer_s(nbytes: float, storage_Bps: float | None, h2d_Bps: float | None) -> tuple[float, float]:
    """Seconds to read `nbytes` from storage and to copy them to the device (None: free, as
    when the file is in RAM, or on a CPU, where the read lands in compute memory)."""
    return (nbytes / storage_Bps if storage_Bps else 0.0), (nbytes / h2d_Bps if h2d_Bps else 0.0)


def predict(layer_bytes: dict[int, int], budget_bytes: int, compute_s: float,
            storage_Bps: float | None, h2d_Bps: float | None) -> Prediction:
    kept = fit_budget(layer_bytes, budget_bytes)
    streamed = sum(n for i, n in layer_bytes.items() if i not in kept)
    read_s, copy_s = transfer_s(streamed, storage_Bps, h2d_Bps)
    session_read_s, session_copy_s = transfer_s(sum(layer_bytes.values()), storage_Bps, h2d_Bps)
    return Prediction(
        streamed_bytes=streamed,
        resident_s=compute_s,
        session_s=compute_s,
        session_load_s=session_read_s + session_copy_s,
        stream_serial_s=compute_s + read_s + copy_s,
        stream_prefetch_s=max(compute_s, read_s, copy_s),
    )


def nf4_linear_bytes(n_in: int, n_out: int, blocksize: int = 64, nested_blocksize: int = 256) -> int:
    """bitsandbytes NF4 with double quantisation (CUDA layout): 4-bit codes, one uint8 absmax
    per block, one fp32 absmax per 256 blocks, the two code tables and the fp32 offset."""
    params = n_in * n_out
    blocks = math.ceil(params / blocksize)
    return params // 2 + blocks + 4 * math.ceil(blocks / nested_blocksize) + 4 * 16 + 4 * 256 + 4


def qwen_layer_nf4_bytes(hidden: int, intermediate: int, n_heads: int, n_kv_heads: int) -> int:
    """One Qwen2-style decoder layer in NF4 (bf16 norms and q/k/v biases)."""
    head_dim = hidden // n_heads
    kv = n_kv_heads * head_dim
    linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
               (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    return sum(nf4_linear_bytes(a, b) for a, b in linears) + 2 * (hidden + 2 * kv) + 2 * 2 * hidden


# The original experiment (REFERENCES.md): Qwen2.5-3B NF4 on an RTX 4050 laptop GPU. vocab and
# tied_head (one matrix for input embedding and output head) from the models' config.json on the Hub.
QWEN25_3B = dict(hidden=2048, intermediate=11008, n_heads=16, n_kv_heads=2, n_layers=36, vocab=151936, tied_head=True)
QWEN25_7B = dict(hidden=3584, intermediate=18944, n_heads=28, n_kv_heads=4, n_layers=28, vocab=152064, tied_head=False)
QWEN25_14B = dict(hidden=5120, intermediate=13824, n_heads=40, n_kv_heads=8, n_layers=48, vocab=152064, tied_head=False)
ORIGINAL = {"standby_GB": (1.92, 1.34), "resident_tok_s": 16.6, "generate_tok_s": 13.6,
            "disk_no_kv_tok_s": 1.5}
RTX4050 = {"h2d_Bps": 12 * GB, "vram_Bps": 192 * GB}
STORAGE = {"file in RAM (page cache)": None, "NVMe PCIe 4.0 (7 GB/s)": 7 * GB, "NVMe PCIe 3.0 (3.5 GB/s)": 3.5 * GB}


def layer_nf4_bytes(model: dict) -> int:
    """One decoder layer of `model` (a QWEN25_* dict) in NF4."""
    return qwen_layer_nf4_bytes(model["hidden"], model["intermediate"], model["n_heads"], model["n_kv_heads"])


def reference_table() -> str:
    layer = layer_nf4_bytes(QWEN25_3B)
    offloaded = select_layers(QWEN25_3B["n_layers"], "even")
    layer_bytes = {i: layer for i in offloaded}
    # measured compute input: the original's own decode loop with every layer loaded
    compute_s = 1 / ORIGINAL["resident_tok_s"]
    lines = [
        f"Qwen2.5-3B NF4, layers {offloaded[0]}..{offloaded[-1]} even ({len(offloaded)} x {layer / 1e6:.1f} MB "
        f"= {len(offloaded) * layer / GB:.2f} GB per token streamed); the original measured standby "
        f"{ORIGINAL['standby_GB'][0]} -> {ORIGINAL['standby_GB'][1]} GB "
        f"({(ORIGINAL['standby_GB'][0] - ORIGINAL['standby_GB'][1]) * 2**30 / len(offloaded) / 1e6:.1f} MB per layer if GiB).",
        f"RTX 4050 laptop: PCIe 4.0 x8 at {RTX4050['h2d_Bps'] / GB:.0f} GB/s, compute {compute_s * 1e3:.1f} ms/token "
        f"(the original's {ORIGINAL['resident_tok_s']} tok/s; its HF generate: {ORIGINAL['generate_tok_s']} tok/s, "
        f"its disk variant without KV cache: {ORIGINAL['disk_no_kv_tok_s']} tok/s).",
        "",
        "| storage | budget | streamed MB/token | resident tok/s | session tok/s (+ load s) | stream, no prefetch tok/s | stream, prefetch tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, storage_Bps in STORAGE.items():
        for budget_layers in (0, 8):
            p = predict(layer_bytes, budget_layers * layer, compute_s, storage_Bps, RTX4050["h2d_Bps"])
            lines.append(
                f"| {name} | {budget_layers} layers | {p.streamed_bytes / 1e6:.0f} | {1 / p.resident_s:.1f} | "
                f"{1 / p.session_s:.1f} (+{p.session_load_s:.2f}) | {1 / p.stream_serial_s:.1f} | "
                f"{1 / p.stream_prefetch_s:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- check against measurements

def read_path(row: dict) -> str:
    """How a streamed layer got its bytes: 'copy' (a read into a slot; every CUDA row, and CPU
    rows from before --cpu-read existed) or 'map' (views of the mapped file)."""
    return row.get("cpu_read") or "copy"


def row_read_Bps(row: dict) -> float:
    """The rate a stream row's layers were read at: its cold storage read rate (--cold rows),
    else its own measured page-cache read time per layer; an --io-bandwidth throttle caps either."""
    per_layer = bench.number(row["loaded_bytes"]) / bench.number(row["loads"])
    read_Bps = bench.number(row.get("cold_read_bytes_s")) or per_layer / (bench.number(row["per_layer_load_ms"]) / 1e3)
    io_Bps = bench.number(row["io_bandwidth"])
    return min(io_Bps, read_Bps) if io_Bps else read_Bps


def row_layer_bytes(row: dict) -> dict[int, int]:
    """A stream row's offloaded layers and the bytes each reads (its per-load average)."""
    per_layer = bench.number(row["loaded_bytes"]) / bench.number(row["loads"])
    return {int(i): int(per_layer) for i in row["layers_offloaded"].split()}


def row_prediction(row: dict, compute_s: float) -> Prediction:
    """predict() for a stream row: its layers, budget and read rate, with `compute_s` per token."""
    return predict(row_layer_bytes(row), int(bench.number(row["budget_bytes"]) or 0), compute_s,
                   row_read_Bps(row), None)


def check_table(results: Path, csv_name: str = "diskoffload.csv") -> str:
    """For each stream row with KV cache that was not busy: predicted vs measured decode time
    per token, with t_compute from the row's own baseline (the unpatched model timed in the
    same process, interleaved) and the storage rate from the row: its cold storage read rate
    (--cold rows), else its throttle or its own measured page-cache read time."""
    lines = ["| model | machine | prefetch | reads | budget MB | io_bandwidth GB/s | t_compute ms | read ms/token | "
             "predicted ms/token | measured ms/token | measured/predicted |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in bench.read_rows(results / csv_name):
        base_tok_s = bench.number(row.get("baseline_decode_tok_s"))
        if not base_tok_s or row["kv_cache"] != "True" or not bench.number(row["loads"]) or row.get("busy") == "True":
            continue
        compute_s = 1 / base_tok_s
        io_Bps = bench.number(row["io_bandwidth"])
        storage_Bps = row_read_Bps(row)
        p = row_prediction(row, compute_s)
        predicted = p.stream_prefetch_s if int(row["prefetch"]) > 0 else p.stream_serial_s
        measured = bench.number(row["decode_ms_per_tok"]) / 1e3
        lines.append(
            f"| {row['model']} {row['quant']} {row['device']} | {row['device_name']} ({row['cpu_isa']}) | "
            f"{row['prefetch']} | {'cold' if row.get('cold_reads') == 'True' else 'page cache'}, {read_path(row)} | "
            f"{bench.number(row['budget_bytes']) / 1e6:.1f} | {io_Bps / GB if io_Bps else '-'} | {compute_s * 1e3:.1f} | "
            f"{p.streamed_bytes / storage_Bps * 1e3:.1f} | {predicted * 1e3:.1f} | {measured * 1e3:.1f} | "
            f"{measured / predicted:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- speculative decoding
#
# Greedy speculative decoding over stream residency: a draft proposes tokens, the target checks
# them in one forward and emits the accepted ones plus its own next token, so the streamed layers
# are read once per verify forward instead of once per token:
#
#     t per token = (drafted_per_verify x t_draft + t_verify) / accepted_per_verify
#     t_verify    = the stream model above with one forward's streamed bytes and compute
#
# accepted_per_verify and drafted_per_verify are measured (results/speculative.csv). Everything
# else is an assumption, and all of them are here:

# A verify forward of k+1 tokens costs one token's compute: batch-1 decoding is bound by reading
# the weights and k+1 tokens read them once. Not measured: bitsandbytes takes its dequantise-then-
# matmul path for more than one token, which may cost more than its one-token kernel.
VERIFY_COMPUTE_FACTOR = 1.0
# Compute time is proportional to the weight bytes a forward reads, at the rate the 3B reference
# computes (its measured 16.6 tok/s over weights_read_bytes(QWEN25_3B)): used for the 7B and 14B
# targets and for drafts. For drafts this is optimistic: a small model's per-layer kernel launches
# are not in its bytes.
# A sibling draft (another model) reads all of its resident bytes as measured per drafted token
# (its embedding table counted, although a token reads one row: pessimistic); a self draft reads
# the target's resident part plus its low-bit substitutes of the streamed layers; prompt lookup
# matches n-grams of the context on the host and costs nothing.
# The draft does not overlap the verify's reads (it runs between verify forwards).
# Acceptance measured on one target and draft pair here carries over to the predicted targets.
# A self draft's substitutes take the bytes per parameter they took in the measured row.
#
# "A 6 GB card": the RTX 4050 laptop's 6 GiB, its PCIe and VRAM rates (RTX4050), NVMe storage.
CARD_VRAM_BYTES = 6 * 2**30
# CUDA context and cuBLAS workspace, bitsandbytes' bf16 copy of one linear for multi-token
# forwards (prefill, verify: 0.14 GB for the 14B's MLP), activations, allocator slack. Not measured.
VRAM_RESERVE_BYTES = 2**30
CONTEXT_TOKENS = 4096       # the KV cache (bf16) is held for this many tokens
STREAM_SLOTS = 2            # device buffers for streamed layers: the one computing and the one being copied
# The input embedding stays on the card (bnb's layout). --offload-embeddings would free an untied one:
# 1.09 GB on the 7B, enough to keep all its layers.
OFFLOAD_INPUT_EMBEDDING = False
NVME = "NVMe PCIe 4.0 (7 GB/s)"  # the storage of the NVMe columns (a STORAGE key)
BYTES_PER_PARAM = {"nf4": nf4_linear_bytes(2048, 11008) / (2048 * 11008), "bf16": 2, "fp16": 2, "fp32": 4}


def head_bytes(model: dict) -> int:
    """The bf16 output head (bitsandbytes leaves it unquantised)."""
    return model["vocab"] * model["hidden"] * 2


def weights_read_bytes(model: dict) -> int:
    """Weight bytes one forward reads: every decoder layer (NF4), the final norm and the head;
    of the input embedding only a forward's rows, left out."""
    return model["n_layers"] * layer_nf4_bytes(model) + 2 * model["hidden"] + head_bytes(model)


# ---------------------------------------------------------------------------- larger than the device
#
# The 7B and 14B shapes run here with dummy weights (results/large.csv). Two predictions of a
# row's decode time per token, both with its own read rate (row_read_Bps):
#   the bound:    max(t_compute, S / read rate), t_compute the unpatched model's decode time
#                 per token timed in the same run (what predict() gives with read-ahead);
#   a priori:     the same, with t_compute from another row: the same machine kind's newest
#                 dummy Qwen2.5-3B NF4 unpatched decode, scaled by weights_read_bytes (compute
#                 time proportional to the weight bytes a forward reads: the assumption behind
#                 this file's 7B and 14B GPU predictions).

SHAPE_PREFIX = "dummy:"
SHAPES = {"qwen2.5-3b": QWEN25_3B, "qwen2.5-7b": QWEN25_7B, "qwen2.5-14b": QWEN25_14B}
LARGE_CSV = "large.csv"
DEVICE_BYTES = 6 * 2**30  # what the large rows must fit: a 6 GB card's 6 GiB


def shape_of(row: dict) -> dict | None:
    """The QWEN25_* shape of a dummy row's model, None for any other model."""
    model = row["model"]
    return SHAPES.get(model[len(SHAPE_PREFIX):]) if model.startswith(SHAPE_PREFIX) else None


def run_kv_cache_bytes(row: dict) -> int:
    """The KV cache a row's run held at its longest: bf16, its prompt and new tokens, its batch."""
    tokens = (int(bench.number(row["prompt_tokens"]) or 0) + int(bench.number(row["max_new_tokens"]) or 0))
    return kv_cache_bytes(shape_of(row), tokens) * int(bench.number(row["batch_size"]) or 1)


def compute_rate_Bps(rows: list[dict], machine: tuple[str, str]) -> float | None:
    """Weight bytes per second the newest non-busy dummy 3B NF4 unpatched decode on `machine`
    ((device_name, cpu_isa)) computed at, from baseline rows or variants' same-run baselines."""
    def unpatched_tok_s(row: dict) -> float | None:
        return bench.number(row["decode_tok_s"] if row["variant"] == "baseline" else row.get("baseline_decode_tok_s"))
    found = [r for r in rows if r["model"] == f"{SHAPE_PREFIX}qwen2.5-3b" and r["quant"] == "nf4"
             and r.get("busy") != "True" and (r["device_name"], r.get("cpu_isa", "")) == machine and unpatched_tok_s(r)]
    if not found:
        return None
    return weights_read_bytes(QWEN25_3B) * unpatched_tok_s(max(found, key=lambda r: r["timestamp"]))


@dataclass(frozen=True)
class LargeCheck:
    """One large row against its bound and its a priori prediction (seconds per token)."""
    row: dict
    device_bytes: int        # peak weights and stream slots (peak_bytes) + the run's KV cache
    compute_s: float         # the unpatched model's decode time per token, same run
    read_s: float            # streamed bytes per token / the row's read rate
    measured_s: float
    a_priori_s: float | None  # None: no dummy 3B row on the same machine kind

    @property
    def bound_s(self) -> float:
        return max(self.compute_s, self.read_s)


def large_checks(rows: list[dict], reference_rows: list[dict]) -> list[LargeCheck]:
    """The non-busy stream rows of dummy shapes in `rows` with a same-run baseline, checked;
    `reference_rows` hold the dummy 3B rows that give each machine kind's compute rate."""
    checks = []
    for row in rows:
        base_tok_s = bench.number(row.get("baseline_decode_tok_s"))
        if shape_of(row) is None or row["mode"] != "stream" or not base_tok_s or row.get("busy") == "True" \
                or not bench.number(row["loads"]):
            continue
        compute_s = 1 / base_tok_s
        p = row_prediction(row, compute_s)
        rate = compute_rate_Bps(reference_rows, (row["device_name"], row.get("cpu_isa", "")))
        a_priori = row_prediction(row, weights_read_bytes(shape_of(row)) / rate) if rate else None
        checks.append(LargeCheck(row, int(bench.number(row["peak_bytes"])) + run_kv_cache_bytes(row), compute_s,
                                 p.streamed_bytes / row_read_Bps(row), bench.number(row["decode_ms_per_tok"]) / 1e3,
                                 a_priori.stream_prefetch_s if a_priori and int(row["prefetch"]) > 0
                                 else a_priori.stream_serial_s if a_priori else None))
    return checks


def large_checks_of(results: Path) -> list[LargeCheck]:
    """large_checks of RESULTS/large.csv against RESULTS' baseline, kvcache and diskoffload rows."""
    reference = [r for name in ("baseline.csv", "kvcache.csv", "diskoffload.csv") for r in bench.read_rows(results / name)]
    return large_checks(bench.read_rows(results / LARGE_CSV), reference)


def large_table(results: Path) -> str:
    """large_checks_of(results) as a table of milliseconds per token."""
    lines = ["| model | machine | reads | prefetch | device GiB (weights, slots, KV) | compute ms | read ms | "
             "bound ms | measured ms | measured/bound | a priori ms | measured/a priori |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in large_checks_of(results):
        r = c.row
        lines.append(f"| {r['model']} {r['quant']} | {r['device_name']} ({r['cpu_isa']}) | "
                     f"{'cold' if r.get('cold_reads') == 'True' else 'page cache'} | {r['prefetch']} | "
                     f"{c.device_bytes / 2**30:.2f} | {c.compute_s * 1e3:.0f} | {c.read_s * 1e3:.0f} | "
                     f"{c.bound_s * 1e3:.0f} | {c.measured_s * 1e3:.0f} | {c.measured_s / c.bound_s:.2f} | "
                     + (f"{c.a_priori_s * 1e3:.0f} | {c.measured_s / c.a_priori_s:.2f} |" if c.a_priori_s else "- | - |"))
    return "\n".join(lines)


# bytes per second at which the 3B reference computes (see the assumptions above)
COMPUTE_Bps = weights_read_bytes(QWEN25_3B) * ORIGINAL["resident_tok_s"]


def compute_s(model: dict) -> float:
    """Compute time per one-token forward of `model`, every layer resident: its weight bytes at
    the 3B reference's measured rate (COMPUTE_Bps)."""
    return weights_read_bytes(model) / COMPUTE_Bps


def kv_cache_bytes(model: dict, tokens: int) -> int:
    """bf16 keys and values of every layer for `tokens` tokens."""
    head_dim = model["hidden"] // model["n_heads"]
    return 2 * model["n_layers"] * model["n_kv_heads"] * head_dim * 2 * tokens


@dataclass(frozen=True)
class Draft:
    name: str                              # as in the CSV: none, lookup, self:<format>, or a model
    nbytes: float = 0.0                    # a sibling draft's resident bytes, as measured
    substitute_ratio: float | None = 0.0   # a self draft's substitute bytes per streamed NF4 byte

    @property
    def kind(self) -> str:
        if self.name in ("none", "lookup"):
            return self.name
        return "self" if self.name.startswith("self:") else "model"

    def card_bytes(self, streamed_bytes: float) -> float:
        """Bytes the draft adds on the device when `streamed_bytes` of the target are streamed."""
        if self.kind == "model":
            return self.nbytes
        return (self.substitute_ratio or 0.0) * streamed_bytes if self.kind == "self" else 0.0

    def read_bytes(self, model: dict, streamed_bytes: float) -> float:
        """Weight bytes read per drafted token."""
        if self.kind == "self":
            return weights_read_bytes(model) - streamed_bytes + self.card_bytes(streamed_bytes)
        return self.card_bytes(streamed_bytes)


PLAIN = Draft("none")


def substitute_ratio(draft_bytes: float | None, plain_read_bytes: float | None, quant: str) -> float | None:
    """A self draft's substitute bytes per byte of NF4 streamed layers: the measured row's
    substitute bytes per parameter of its streamed layers (plain_read_bytes of the row's `quant`)
    over NF4's bytes per parameter. None when the row does not tell."""
    bpp = BYTES_PER_PARAM.get(quant)
    if not (draft_bytes and plain_read_bytes and bpp):
        return None
    return draft_bytes / (plain_read_bytes / bpp) / BYTES_PER_PARAM["nf4"]


def speculative_s_per_token(drafted_per_verify: float, accepted_per_verify: float,
                            t_draft_s: float, t_verify_s: float) -> float:
    """Time per emitted token: the drafting and the one verify forward, shared by the tokens it emits."""
    return (drafted_per_verify * t_draft_s + t_verify_s) / accepted_per_verify


@dataclass(frozen=True)
class SpeculativePrediction:
    streamed_bytes: int       # read per verify forward
    draft_s: float            # per drafted token
    verify_serial_s: float    # prefetch 0
    verify_prefetch_s: float  # prefetch >= 1
    serial_s: float           # per emitted token, prefetch 0
    prefetch_s: float         # per emitted token, prefetch >= 1


def predict_speculative(model: dict, streamed: list[int], storage_Bps: float | None, h2d_Bps: float | None,
                        accepted_per_verify: float, drafted_per_verify: float, draft: Draft = PLAIN) -> SpeculativePrediction:
    """`model` (a QWEN25_* dict, NF4) with the layers `streamed` read per verify forward; the
    verify's compute is VERIFY_COMPUTE_FACTOR one-token forwards, a drafted token costs the
    draft's read bytes at COMPUTE_Bps. With draft PLAIN, accepted 1 and drafted 0 this is predict's
    stream residency."""
    layer = layer_nf4_bytes(model)
    # with nothing drafted the verify is a one-token forward, whatever VERIFY_COMPUTE_FACTOR says
    factor = VERIFY_COMPUTE_FACTOR if drafted_per_verify else 1.0
    verify = predict({i: layer for i in streamed}, 0, factor * compute_s(model), storage_Bps, h2d_Bps)
    t_draft = draft.read_bytes(model, verify.streamed_bytes) / COMPUTE_Bps
    return SpeculativePrediction(
        streamed_bytes=verify.streamed_bytes,
        draft_s=t_draft,
        verify_serial_s=verify.stream_serial_s,
        verify_prefetch_s=verify.stream_prefetch_s,
        serial_s=speculative_s_per_token(drafted_per_verify, accepted_per_verify, t_draft, verify.stream_serial_s),
        prefetch_s=speculative_s_per_token(drafted_per_verify, accepted_per_verify, t_draft, verify.stream_prefetch_s),
    )


def card_bytes(model: dict, n_streamed: int, draft: Draft = PLAIN) -> float:
    """Device bytes with the last `n_streamed` layers streamed: the reserve, the KV cache, the
    head (and the input embedding unless offloaded or tied), the resident layers, the stream slots
    and what the draft adds."""
    layer = layer_nf4_bytes(model)
    embedding = 0 if OFFLOAD_INPUT_EMBEDDING or model["tied_head"] else head_bytes(model)
    slots = STREAM_SLOTS * layer if n_streamed else 0
    return (VRAM_RESERVE_BYTES + kv_cache_bytes(model, CONTEXT_TOKENS) + head_bytes(model) + embedding
            + 2 * model["hidden"] + (model["n_layers"] - n_streamed) * layer + slots
            + draft.card_bytes(n_streamed * layer))


def card_streamed_layers(model: dict, vram_bytes: int = CARD_VRAM_BYTES, draft: Draft = PLAIN) -> list[int] | None:
    """The fewest layers to stream so that card_bytes fits `vram_bytes`: the last ones (the stream
    model keeps the first that fit, as offload_skip.fit_budget does; equal layers, so which ones
    does not change the time). None if nothing fits."""
    n = model["n_layers"]
    for n_streamed in range(n + 1):
        if card_bytes(model, n_streamed, draft) <= vram_bytes:
            return list(range(n - n_streamed, n))
    return None


@dataclass(frozen=True)
class Acceptance:
    model: str                   # the target it was measured on
    quant: str
    prompt_kind: str
    draft: Draft
    accepted_per_verify: float   # pooled over the rows' verify forwards
    drafted_per_verify: float
    rows: int


_KIND_ORDER = {"code": 0, "wiki": 1}  # code prompts are the headline


def measured_acceptance(rows: list[dict]) -> list[Acceptance]:
    """Per (model, quant, draft, prompt_kind): the non-busy rows with a draft asked at every verify
    (the constant schedule; an adaptive row's plain steps say what this CPU's timings chose, not
    what the draft accepts), their accepted_per_verify and drafted_per_verify averaged weighted
    by verify_forwards (cold_reads and prefetch change the time, not the greedy tokens), code
    prompts first."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if (row.get("busy") == "True" or row.get("draft", "none") == "none" or row.get("schedule") == "adaptive"
                or not bench.number(row.get("accepted_per_verify"))):
            continue
        groups.setdefault((row["model"], row["quant"], row["draft"], row["prompt_kind"]), []).append(row)
    out = []
    for (model, quant, name, kind), group in groups.items():
        weights = [bench.number(r.get("verify_forwards")) or 1.0 for r in group]

        def pooled(column: str) -> float:
            return sum(w * (bench.number(r.get(column)) or 0.0) for w, r in zip(weights, group)) / sum(weights)

        draft_bytes = pooled("draft_bytes")
        draft = Draft(name, draft_bytes, substitute_ratio(draft_bytes, pooled("plain_read_bytes_per_token"), quant)
                      if name.startswith("self:") else 0.0)
        out.append(Acceptance(model, quant, kind, draft, pooled("accepted_per_verify"), pooled("drafted_per_verify"), len(group)))
    return sorted(out, key=lambda a: (_KIND_ORDER.get(a.prompt_kind, 2), a.prompt_kind, a.model, a.draft.name))


def _speculative_setups() -> list[tuple]:
    """(column, model, storage bytes/s or None: the page cache, fixed streamed layers or None: as
    many as the 6 GB card needs)."""
    reference = select_layers(QWEN25_3B["n_layers"], "even")
    return [
        (f"3B ref, page cache -> PCIe {RTX4050['h2d_Bps'] / GB:.0f} GB/s", QWEN25_3B, None, reference),
        (f"3B ref, NVMe {STORAGE[NVME] / GB:g} GB/s", QWEN25_3B, STORAGE[NVME], reference),
        (f"7B, 6 GB card, NVMe {STORAGE[NVME] / GB:g} GB/s", QWEN25_7B, STORAGE[NVME], None),
        (f"14B, 6 GB card, NVMe {STORAGE[NVME] / GB:g} GB/s", QWEN25_14B, STORAGE[NVME], None),
    ]


@dataclass(frozen=True)
class SetupPrediction:
    """One setup's predicted tok/s for one draft, as a table cell."""
    setup: str
    tok_s: float | None            # None: a self draft of unknown width, or the model does not fit
    plain_tok_s: float | None
    streamed: list[int] | None     # None: does not fit the card
    n_layers: int
    fixed: bool                    # the streamed layers are the setup's, not fitted to the card

    def cell(self) -> str:
        if self.streamed is None:
            return "does not fit"
        if self.tok_s is None:
            return "-"
        text = f"{self.tok_s:.1f}" + (f" ({self.tok_s / self.plain_tok_s:.2f}x)" if self.plain_tok_s else "")
        # on the 6 GB card a draft's bytes may push more layers out: say how many are streamed
        return text if self.fixed else f"{text}, {len(self.streamed)}/{self.n_layers} streamed"


def _speculative_tok_s(model: dict, storage_Bps, fixed, accepted: float, drafted: float, draft) -> tuple:
    streamed = fixed if fixed is not None else card_streamed_layers(model, draft=draft)
    if streamed is None or (draft.kind == "self" and draft.substitute_ratio is None):
        return None, streamed
    p = predict_speculative(model, streamed, storage_Bps, RTX4050["h2d_Bps"], accepted, drafted, draft)
    return 1 / p.prefetch_s, streamed


def speculative_predictions(acceptance: Acceptance | None) -> list[SetupPrediction]:
    """Each setup's predicted tok/s with read-ahead for a measured draft (None: plain stream)."""
    out = []
    for column, model, storage, fixed in _speculative_setups():
        plain, streamed = _speculative_tok_s(model, storage, fixed, 1, 0, PLAIN)
        if acceptance is None:
            tok_s, plain = plain, None
        else:
            tok_s, streamed = _speculative_tok_s(model, storage, fixed, acceptance.accepted_per_verify,
                                                 acceptance.drafted_per_verify, acceptance.draft)
        out.append(SetupPrediction(column, tok_s, plain, streamed, model["n_layers"], fixed is not None))
    return out


def speculative_table(results_dir: Path, csv_name: str = "speculative.csv") -> str:
    """Predicted tok/s, plain stream against speculative, for each draft measured in
    results_dir/csv_name: the 3B reference (the original's even layers 2..32 streamed) from the
    page cache and from NVMe, the 7B and 14B NF4 on a 6 GB card from NVMe; read-ahead on."""
    path = Path(results_dir) / csv_name
    measured = measured_acceptance(bench.read_rows(path))
    if not measured:
        return f"No speculative predictions: {path} {'has no non-busy rows with a draft' if path.is_file() else 'is missing'}."
    reference = select_layers(QWEN25_3B["n_layers"], "even")
    setups = _speculative_setups()
    layer_7b, layer_14b = layer_nf4_bytes(QWEN25_7B), layer_nf4_bytes(QWEN25_14B)
    lines = [
        f"Predicted tok/s with read-ahead (x: against the plain stream on the same setup). Acceptance: {path.name}'s "
        f"non-busy rows with a draft asked at every verify (constant schedule), pooled over their verify forwards per "
        f"target, draft and prompt kind. 3B reference: "
        f"Qwen2.5-3B NF4, even layers {reference[0]}..{reference[-1]} streamed, RTX 4050 laptop. 6 GB card: the same "
        f"card, {CARD_VRAM_BYTES / 2**30:.0f} GiB less {VRAM_RESERVE_BYTES / 2**30:g} GiB reserve, the KV cache of "
        f"{CONTEXT_TOKENS} tokens and {STREAM_SLOTS} stream slots; as few of the last layers streamed as fit (7B layer "
        f"{layer_7b / 1e6:.0f} MB, 14B {layer_14b / 1e6:.0f} MB). Compute: weight bytes at the 3B's measured "
        f"{ORIGINAL['resident_tok_s']} tok/s ({COMPUTE_Bps / GB:.1f} GB/s), drafts too; a verify forward costs "
        f"{VERIFY_COMPUTE_FACTOR:g} token's compute. The assumptions: estimate.py, section speculative decoding.",
        "",
        "| draft | prompts | measured on (rows) | accepted / drafted per verify | " + " | ".join(c for c, *_ in setups) + " |",
        "|---|---|---|---|" + "---|" * len(setups),
        "| none (plain stream) | - | - | 1 / 0 | " + " | ".join(p.cell() for p in speculative_predictions(None)) + " |",
    ]
    for a in measured:
        lines.append(f"| {a.draft.name} | {a.prompt_kind} | {a.model} {a.quant} ({a.rows}) | "
                     f"{a.accepted_per_verify:.2f} / {a.drafted_per_verify:.2f} | "
                     + " | ".join(p.cell() for p in speculative_predictions(a)) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- --plan: offload_skip.plan on a 6 GB card
#
# offload_skip.plan with the card's rates instead of probed ones: per-layer compute from
# COMPUTE_Bps (the 3B reference's rate), reads from the storage (or host memory for the page
# cache) plus PCIe, added (the GPU reader overlaps the two in chunks: pessimistic), no compute
# lost to a copy (the copy engine). The device is the card less VRAM_RESERVE_BYTES; the KV
# cache of CONTEXT_TOKENS is reserved. An assumption, not measured here: host memory delivers
# HOST_MEMORY_Bps to the pinned staging when the layer files are in the page cache.
HOST_MEMORY_Bps = 50 * GB
PLAN_STORAGE = {"page cache": HOST_MEMORY_Bps, NVME: STORAGE[NVME]}


def card_shape(model: dict):
    """offload_skip.ModelBytes of a QWEN25_* shape in NF4 (bf16 embedding and head)."""
    import offload_skip

    embedding = head_bytes(model)  # the same bf16 vocab x hidden matrix
    return offload_skip.ModelBytes((layer_nf4_bytes(model),) * model["n_layers"], embedding,
                                   0 if model["tied_head"] else head_bytes(model), 2 * model["hidden"],
                                   model["tied_head"], kv_cache_bytes(model, 1))


def card_plan(model: dict, read_Bps: float):
    import offload_skip

    rates = offload_skip.Rates(layer_compute_s=layer_nf4_bytes(model) / COMPUTE_Bps,
                               fixed_compute_s=(head_bytes(model) + 2 * model["hidden"]) / COMPUTE_Bps,
                               read_Bps=read_Bps, h2d_Bps=RTX4050["h2d_Bps"], read_compute_share=0.0,
                               source="RTX 4050 laptop rates (estimate.py)")
    return offload_skip.plan(card_shape(model), CARD_VRAM_BYTES - VRAM_RESERVE_BYTES, rates=rates,
                             context_tokens=CONTEXT_TOKENS, device="cuda")


def plan_table() -> str:
    """The plan for the reference setup's model, the 7B and the 14B on a 6 GB RTX 4050 laptop."""
    lines = [f"RTX 4050 laptop, {CARD_VRAM_BYTES / 2**30:.0f} GiB less a {VRAM_RESERVE_BYTES / 2**30:g} GiB reserve; "
             f"PCIe {RTX4050['h2d_Bps'] / GB:.0f} GB/s; compute at the 3B reference's "
             f"{COMPUTE_Bps / GB:.1f} GB/s of weights; KV cache for {CONTEXT_TOKENS} tokens; page cache read at "
             f"{HOST_MEMORY_Bps / GB:.0f} GB/s (assumed)."]
    for name, model in (("Qwen2.5-3B", QWEN25_3B), ("Qwen2.5-7B", QWEN25_7B), ("Qwen2.5-14B", QWEN25_14B)):
        for storage, rate in PLAN_STORAGE.items():
            try:
                plan = card_plan(model, rate)
            except ValueError as err:
                lines.append(f"\n{name} NF4, layers from {storage}: {err}")
                continue
            lines.append(f"\n{name} NF4, layers from {storage}:\n{plan}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", type=Path, metavar="RESULTS_DIR",
                        help="also compare predictions with the rows in RESULTS_DIR/diskoffload.csv "
                             "(and RESULTS_DIR/large.csv: the dummy 7B and 14B shapes)")
    parser.add_argument("--speculative", type=Path, metavar="RESULTS_DIR",
                        help="also predict speculative decoding with the acceptance in RESULTS_DIR/speculative.csv")
    parser.add_argument("--plan", action="store_true",
                        help="also print offload_skip.plan for the 3B, 7B and 14B on a 6 GB RTX 4050 laptop")
    args = parser.parse_args(argv)
    print(reference_table())
    if args.plan:
        print("\nFit to a 6 GB card (offload_skip.plan, the card's rates stated):\n" + plan_table())
    if args.speculative:
        print("\nSpeculative decoding over stream residency, predicted:\n" + speculative_table(args.speculative))
    if args.check:
        print("\nThis machine, measured vs predicted (decode time per token):\n" + check_table(args.check))
        if (args.check / LARGE_CSV).exists():
            print(f"\nLarger than the device ({LARGE_CSV}): the same-run bound, and the prediction from the "
                  f"{SHAPE_PREFIX}qwen2.5-3b row's compute rate:\n" + large_table(args.check))


if __name__ == "__main__":
    main()
