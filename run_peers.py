"""Stream residency against the peers a user would reach for instead: the same model, the
same offloaded layers and the same greedy decode loop, timed in interleaved rounds in one
process (resident, ours, each peer, repeated), so every ratio is a same-run ratio.

Peers: Hugging Face accelerate's disk offload (``device_map`` sends the layers to "disk";
transformers 5 reads them from the checkpoint's own safetensors file) and its CPU offload
(the layers' weights kept in CPU RAM and moved to the GPU per forward: on a CPU-only
machine the CPU is the execution device, so it does not apply and the row says so). And
AirLLM (pip install airllm), which streams every decoder layer from its own per-layer files
for every token; it is too slow to interleave, so it is timed once, after the rounds, on a
short decode (its row's note says so). accelerate cannot offload bitsandbytes 4-bit modules,
hence --quant bf16 by default.

    python run_peers.py --model smollm2-135m --prefetch 0      # appends to results/peers.csv
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

import bench
import offload_skip

PEERS = ("accelerate-disk", "accelerate-cpu", "airllm")
AIRLLM_TOKENS = 8  # AirLLM streams every layer for every token: a short decode, timed once


@bench.csv_row
class PeerRow:
    """One system of one peers run: a row of results/peers.csv."""
    system: str            # resident, stream (ours), accelerate-disk, accelerate-cpu
    model: str
    quant: str
    device: str
    device_name: str
    layers: str
    layers_offloaded: str
    n_layers: int
    prefetch: int | None   # ours only
    max_new_tokens: int
    batch_size: int
    repeats: int
    decode_tok_s: float | None      # median over the rounds, tokens of the whole batch per second
    resident_decode_tok_s: float    # the resident model's, same rounds
    ratio_to_resident: float | None
    idle_bytes: int | None   # weights on the device while idle (each storage once; meta tensors not)
    peak_bytes: int | None   # most weight bytes on the device during a decode
    rss_delta_bytes: int | None  # process RSS this system added (or saved), see COLUMN_NOTES
    note: str
    run_id: str
    command: str


RSS_NOTE = ("rss_delta_bytes: resident = RSS after loading the model minus before; stream = after patching and "
            "standby() minus the resident model's; a peer = after loading it and one decode minus before loading "
            "it (memory-mapped checkpoint pages it touched count)")


def accelerate_device_map(model, offloaded: list[int], where: str, device: str) -> dict[str, str]:
    """device_map for from_pretrained: the offloaded decoder layers to `where` ("disk" or
    "cpu"), every other top-level module and layer to `device`."""
    layers_path = _layers_path(model)
    device_map = {}
    for name, _ in model.named_children():
        if name != layers_path.split(".")[0]:
            device_map[name] = device
    parent = model.get_submodule(layers_path.rsplit(".", 1)[0])
    for name, _ in parent.named_children():
        full = f"{layers_path.rsplit('.', 1)[0]}.{name}"
        if full != layers_path:
            device_map[full] = device
    for i in range(len(offload_skip.find_decoder_layers(model))):
        device_map[f"{layers_path}.{i}"] = where if i in offloaded else device
    return device_map


def _layers_path(model) -> str:
    layers = offload_skip.find_decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def check_peers(peers: list[str], quant: str) -> list[str]:
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise bench.UsageError(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if quant == "nf4" and peers:
        raise bench.UsageError("accelerate cannot offload bitsandbytes 4-bit modules; "
                               "use --quant bf16 (or fp32) for the peers, or --peers none for ours alone")
    return peers


def _rss() -> int:
    gc.collect()
    offload_skip.trim_host_memory()
    import psutil
    return psutil.Process().memory_info().rss


def _offload_peak(model, device: torch.device):
    """Wrap every accelerate-hooked module's forward so a decode records the weight bytes on
    the device while it runs (accelerate loads an offloaded module's weights just before its
    forward and drops them right after); returns (peak holder, undo)."""
    idle = offload_skip.tensor_bytes(offload_skip.module_tensors(model), device)
    peak = [idle]
    wrapped = []
    for module in model.modules():
        if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
            original = module._old_forward

            def sampled(*args, _module=module, _original=original, **kwargs):
                own = offload_skip.tensor_bytes(_module.parameters(recurse=False), device)
                peak[0] = max(peak[0], idle + own)
                return _original(*args, **kwargs)
            module._old_forward = sampled
            wrapped.append((module, original))

    def undo():
        for module, original in wrapped:
            module._old_forward = original
    return peak, undo


def load_peer(peer: str, source, quant: str, device: str, offloaded: list[int], folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    where = "disk" if peer == "accelerate-disk" else "cpu"
    device_map = accelerate_device_map(skeleton, offloaded, where, device)
    return AutoModelForCausalLM.from_pretrained(source, dtype=bench.models._TORCH_DTYPES[quant],
                                                device_map=device_map, offload_folder=str(folder)).eval()


def load_airllm(source, quant: str, device: str, folder: Path):
    try:
        from airllm import AutoModel
    except ImportError:
        raise bench.UsageError("--peers airllm needs AirLLM; run: pip install airllm") from None
    return AutoModel.from_pretrained(str(source), device=device, dtype=bench.models._TORCH_DTYPES[quant],
                                     layer_shards_saving_path=str(folder / "airllm"))


def run(args) -> list[PeerRow]:
    # accelerate's offload index and AirLLM's per-layer shards (a copy of the model) live here
    with tempfile.TemporaryDirectory(prefix="peers-offload-") as folder:
        return _run(args, Path(folder))


def _run(args, folder: Path) -> list[PeerRow]:
    peers = check_peers([p for p in args.peers.split(",") if p and p != "none"], args.quant)
    import transformers  # noqa: F401  (imported before the first RSS sample: its own memory is not the model's)
    rss0 = _rss()
    run_ = bench.open_run(args, whole=True)  # the resident model is a peer: loaded whole, as a user would
    device = run_.device
    unpatched = bench.measure_memory(run_)
    rss_resident = _rss()
    ctl = bench.patch(run_)
    ctl.standby()
    rss_ours = _rss()
    source, _ = bench.resolve_model(args.model, args.cache_dir)
    ids, mask, n = run_.input_ids, run_.attention_mask, args.max_new_tokens
    systems = {"resident": (run_.model, ctl.unpatched), "stream": (run_.model, bench.inference(ctl))}
    extra = {"resident": dict(idle=unpatched.standby_bytes, peak=unpatched.standby_bytes, rss=rss_resident - rss0),
             "stream": dict(idle=ctl.resident_bytes(), peak=None, rss=rss_ours - rss_resident)}
    reads = f", layers {'mapped' if ctl.cpu_read == 'map' else 'read'}" if ctl.cpu_read else ""  # CPU only
    notes = {"resident": "", "stream": f"offload-skip stream residency, prefetch {ctl.prefetch}{reads}"}
    # what every peer's greedy tokens are checked against (AirLLM's shorter decode: a prefix)
    expected = bench.decode(run_.model, ids, n, context=ctl.unpatched, attention_mask=mask).tokens
    airllm = None
    for peer in peers:
        if peer == "airllm":
            before = _rss()
            airllm = load_airllm(source, args.quant, str(device), folder)
            extra[peer] = dict(rss=_rss() - before)
            continue
        if peer == "accelerate-cpu" and device.type == "cpu":
            notes[peer] = "not applicable on a CPU-only machine: the CPU is the execution device, nothing moves"
            continue
        before = _rss()
        model = load_peer(peer, source, args.quant, str(device), run_.layers, folder)
        peak, undo = _offload_peak(model, device)
        tokens = bench.decode(model, ids, n, attention_mask=mask).tokens  # warm-up, and the peak
        undo()
        notes[peer] = "greedy tokens equal to the resident model's" if torch.equal(tokens, expected) else \
            "greedy tokens DIFFER from the resident model's"
        systems[peer] = (model, None)
        extra[peer] = dict(idle=offload_skip.tensor_bytes(offload_skip.module_tensors(model), device),
                           peak=peak[0], rss=_rss() - before)
    times = {name: [] for name in systems}
    peaks = []
    rounds = args.warmup + args.repeats
    with bench.measure.watch_cpu() as cpu:
        for r in tqdm(range(rounds), desc="interleaved rounds", unit="round"):
            for name, (model, context) in systems.items():
                ctl.reset_stats()
                timing = bench.decode(model, ids, n, context=context or contextlib.nullcontext, attention_mask=mask)
                if name == "stream":
                    peaks.append(ctl.stats()["peak_resident_bytes"])
                if r >= args.warmup:
                    times[name].append(timing.decode_s)
    extra["stream"]["peak"] = max(peaks)
    batch = ids.shape[0]
    tok_s = {name: batch * (n - 1) / statistics.median(t) for name, t in times.items()}
    if airllm is not None:
        short = min(n, AIRLLM_TOKENS)
        timing = bench.decode(airllm, ids, short, attention_mask=mask)
        tok_s["airllm"] = batch * (short - 1) / timing.decode_s
        systems["airllm"] = (airllm, None)
        extra["airllm"].update(idle=None, peak=None)
        same = "equal to" if torch.equal(timing.tokens, expected[:, :short]) else "DIFFERENT from"
        notes["airllm"] = (f"AirLLM {bench.package_version('airllm')}: every layer streamed; one decode of {short} tokens after "
                           f"the rounds, not interleaved; greedy tokens {same} the resident model's")
    env = bench.environment()
    rows = []
    for name in list(systems) + [p for p in peers if p not in systems]:
        measured = name in systems
        rows.append(PeerRow(
            system=name, model=run_.info["model"], quant=run_.info["quant"], device=device.type,
            device_name=bench.device_name(device), layers=args.layers,
            layers_offloaded=" ".join(map(str, range(run_.info["n_layers"]) if name == "airllm" else run_.layers)),
            n_layers=run_.info["n_layers"],
            prefetch=ctl.prefetch if name == "stream" else None, max_new_tokens=n, batch_size=batch,
            repeats=args.repeats, decode_tok_s=tok_s.get(name), resident_decode_tok_s=tok_s["resident"],
            ratio_to_resident=tok_s[name] / tok_s["resident"] if measured else None,
            idle_bytes=extra[name]["idle"] if measured else None, peak_bytes=extra[name]["peak"] if measured else None,
            rss_delta_bytes=extra[name]["rss"] if measured else None,
            note=notes[name] + ("; BUSY: other work shared the CPU" if cpu[0].busy else ""),
            run_id=run_.run_id, command=args.command, **env))
    _print(rows)
    bench.append_rows(args.out, rows)
    print(f"  {len(rows)} rows appended to {args.out}")
    return rows


def _print(rows: list[PeerRow]) -> None:
    for row in rows:
        speed = "" if row.decode_tok_s is None else \
            f"{row.decode_tok_s:7.2f} tok/s ({row.ratio_to_resident:.2f}x resident)"
        memory = "" if row.idle_bytes is None else \
            f" idle {row.idle_bytes / 1e6:.1f} MB, peak {row.peak_bytes / 1e6:.1f} MB, RSS {row.rss_delta_bytes / 1e6:+.1f} MB"
        print(f"{row.system:<16} {speed}{memory}  {row.note}")
    by = {r.system: r for r in rows}
    if "accelerate-disk" in by and by["accelerate-disk"].decode_tok_s:
        print(f"stream / accelerate-disk: {by['stream'].decode_tok_s / by['accelerate-disk'].decode_tok_s:.2f}x")


def build_parser():
    parser = bench.build_parser("diskoffload", description=__doc__.split("\n\n")[0], prog=Path(__file__).name)
    parser.set_defaults(quant="bf16", ppl_max_tokens=0, repeats=5, max_new_tokens=32,
                        out=bench.RESULTS_DIR / "peers.csv")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers to run beside ours: {', '.join(PEERS)}; none for ours alone")
    return parser


def finish(args):
    args = bench.finish_args(args, PeerRow)
    if not args.kv_cache:
        raise bench.UsageError("--no-kv-cache: the peers are compared with the KV cache on")
    return args


def main(argv: list[str] | None = None) -> int:
    return bench.main(run, build_parser(), argv, finish=finish)


if __name__ == "__main__":
    raise SystemExit(main())
