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

    python estimate.py                      # Qwen2.5-3B NF4, even layers 2..32, RTX 4050 laptop
    python estimate.py --check results      # predictions next to this machine's measurements

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


# The original experiment (REFERENCES.md): Qwen2.5-3B NF4 on an RTX 4050 laptop GPU.
QWEN25_3B = dict(hidden=2048, intermediate=11008, n_heads=16, n_kv_heads=2, n_layers=36)
ORIGINAL = {"standby_GB": (1.92, 1.34), "resident_tok_s": 16.6, "generate_tok_s": 13.6,
            "disk_no_kv_tok_s": 1.5}
RTX4050 = {"h2d_Bps": 12 * GB, "vram_Bps": 192 * GB}
STORAGE = {"file in RAM (page cache)": None, "NVMe PCIe 4.0 (7 GB/s)": 7 * GB, "NVMe PCIe 3.0 (3.5 GB/s)": 3.5 * GB}


def reference_table() -> str:
    layer = qwen_layer_nf4_bytes(**{k: v for k, v in QWEN25_3B.items() if k != "n_layers"})
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
        per_layer = bench.number(row["loaded_bytes"]) / bench.number(row["loads"])
        layers = [int(i) for i in row["layers_offloaded"].split()] if row["layers_offloaded"] else []
        layer_bytes = {i: int(per_layer) for i in layers}
        io_Bps = bench.number(row["io_bandwidth"])
        measured_read_Bps = per_layer / (bench.number(row["per_layer_load_ms"]) / 1e3)
        storage_Bps = min(io_Bps, measured_read_Bps) if io_Bps else measured_read_Bps
        cold_Bps = bench.number(row.get("cold_read_bytes_s"))
        if cold_Bps:
            storage_Bps = min(io_Bps, cold_Bps) if io_Bps else cold_Bps
        p = predict(layer_bytes, int(bench.number(row["budget_bytes"]) or 0), compute_s, storage_Bps, None)
        predicted = p.stream_prefetch_s if int(row["prefetch"]) > 0 else p.stream_serial_s
        measured = bench.number(row["decode_ms_per_tok"]) / 1e3
        lines.append(
            f"| {row['model']} {row['quant']} {row['device']} | {row['device_name']} ({row['cpu_isa']}) | "
            f"{row['prefetch']} | {'cold' if row.get('cold_reads') == 'True' else 'page cache'} | "
            f"{bench.number(row['budget_bytes']) / 1e6:.1f} | {io_Bps / GB if io_Bps else '-'} | {compute_s * 1e3:.1f} | "
            f"{p.streamed_bytes / storage_Bps * 1e3:.1f} | {predicted * 1e3:.1f} | {measured * 1e3:.1f} | "
            f"{measured / predicted:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", type=Path, metavar="RESULTS_DIR",
                        help="also compare predictions with the rows in RESULTS_DIR/diskoffload.csv")
    args = parser.parse_args(argv)
    print(reference_table())
    if args.check:
        print("\nThis machine, measured vs predicted (decode time per token):\n" + check_table(args.check))


if __name__ == "__main__":
    main()
