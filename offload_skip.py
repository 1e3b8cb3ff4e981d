"""Disk-backed decoder-layer offload with residual injection: the core of this repo.

Some decoder layers of a Hugging Face causal LM are written to per-layer safetensors files
and replaced in ``model.model.layers`` by stubs. A stub remembers the hidden state it is
given and passes it on unchanged. The last stub of a run of consecutive offloaded layers
brings those layers back, computes each one from the remembered input x with the layer's
own call arguments (mask, rotary embeddings, KV-cache slot) and hands the next resident
layer

    torch.lerp(x, L(x), alpha)                      one offloaded layer in the run
    x + sum_i alpha_i * (L_i(x) - x)   (in fp32)    several: parallel residuals

With alpha = 1 and no two offloaded layers adjacent the first form returns L(x) itself,
bit for bit, so the patched model computes exactly what the original model computes.
A layer with alpha = 0 is removed: never read, never computed. With inject_distance = k > 1
a run's contribution sum_i alpha_i (L_i(x) - x) is added later, before the k-th resident
layer after the run (a different model, by design).

Pieces, top to bottom: ``select_layers`` (which layers), the tensor plumbing of a layer
(parameters, buffers and bitsandbytes quant states), the layer file format and
``LayerStore`` (manifest, validation), reading a layer into a buffer (``read_layer``,
``Staging``), ``Counters``, the ways a layer comes back, each a ``Residency`` (acquire,
release, close, held_bytes): ``KeptBuffers`` (a buffer of its own), ``LayerStreamer``
(reusable slots, read ahead), on a CPU ``LayerMaps`` (views of the mapped file);
``EmbeddingRows`` (an input embedding read row by row), ``OffloadConfig`` (how to offload,
checked once), ``OffloadController`` (what moves of a layer: ``LayerTensors``; when: its
residency, chosen once; the stubs and the injection) and ``patch_model``. No CLI here: the
scripts live in run_*.py.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import ctypes
import dataclasses
import functools
import hashlib
import json
import mmap
import os
import re
import threading
import time
import typing
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

FORMAT = "offload-skip/2"
# Every tensor in a layer file starts on this boundary, and so does the data section. cuBLAS(Lt)
# picks kernels by pointer alignment up to 256 bytes, and original CUDA weights sit on the
# allocator's 512-byte boundaries: a view at a smaller alignment could take another kernel,
# round differently and break alpha = 1 exactness on a GPU. (Format 1 aligned to 64 bytes;
# the format is part of the cache fingerprint, so old caches are rebuilt, never misread.)
ALIGN_BYTES = 256
EMBEDDING = "embedding"  # the input embedding's key in a LayerStore (layers are ints)


class CacheError(RuntimeError):
    """A layer file is missing, truncated, corrupt or stale. The message names the file and
    says how to recover."""


def _bad_file(path: Path, problem: str) -> CacheError:
    # Every layer file of a model can be rewritten from the model: deleting its folder is the cure.
    return CacheError(f"{path}: {problem}; delete {Path(path).parent} to rebuild")


# --------------------------------------------------------------------------- selection

def select_layers(num_layers: int, pattern: str, keep_first: int = 2, keep_last: int = 3) -> list[int]:
    """Decoder-layer indices to offload, sorted.

    Named patterns pick from the band keep_first <= i <= num_layers-1-keep_last: ``even`` and
    ``odd`` by index parity, ``every:K`` = keep_first, keep_first+K, ..., ``blocks:N`` = runs
    of N adjacent layers offloaded, then N kept, from keep_first on (N = 1 is ``even`` when
    keep_first is even; N > 1 makes parallel residuals). Explicit lists and inclusive ranges
    (``2,4,7``, ``2-10,14``) may name any index of the model.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if keep_first < 0 or keep_last < 0:
        raise ValueError(f"keep_first and keep_last must be >= 0, got {keep_first} and {keep_last}")
    text = str(pattern).strip().lower()
    band = range(keep_first, num_layers - keep_last)
    if text in ("even", "odd"):
        chosen = [i for i in band if i % 2 == (0 if text == "even" else 1)]
    elif text.startswith(("every:", "blocks:")):
        name, step = text.split(":", 1)
        if not step.isdigit() or int(step) == 0:
            raise ValueError(f"layer pattern {pattern!r}: {name}:N needs a whole number N >= 1")
        n = int(step)
        chosen = list(band[::n]) if name == "every" else [i for i in band if (i - keep_first) // n % 2 == 0]
    else:
        chosen = _parse_explicit(text, num_layers, pattern)
    if not chosen:
        raise ValueError(
            f"layer pattern {pattern!r} selects no layers of a {num_layers}-layer model "
            f"(band {keep_first}..{num_layers - 1 - keep_last})")
    return chosen


def _parse_explicit(text: str, num_layers: int, pattern: str) -> list[int]:
    if not text:
        raise ValueError("layer pattern is empty; use even, odd, every:K, blocks:N, or a list like 2,4,7 or 2-10")
    seen: set[int] = set()
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not match:
            raise ValueError(
                f"layer pattern {pattern!r}: cannot read {item.strip()!r}; "
                "use even, odd, every:K, blocks:N, or a list like 2,4,7 or 2-10")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"layer pattern {pattern!r}: range {first}-{last} is reversed")
        for i in range(first, last + 1):
            if i >= num_layers:
                raise ValueError(
                    f"layer pattern {pattern!r}: layer {i} is out of range (model has layers 0..{num_layers - 1})")
            if i in seen:
                raise ValueError(f"layer pattern {pattern!r}: layer {i} is named twice")
            seen.add(i)
    return sorted(seen)


# --------------------------------------------------------------------------- tensors of a layer

@dataclass(frozen=True)
class TensorRef:
    """Where one tensor of a layer lives: a parameter, a buffer, or a quant-state attribute."""
    owner: object
    attr: str
    kind: str  # "param" | "buffer" | "attr"

    def get(self) -> torch.Tensor:
        if self.kind == "param":
            return self.owner._parameters[self.attr].data
        if self.kind == "buffer":
            return self.owner._buffers[self.attr]
        return getattr(self.owner, self.attr)

    def set(self, tensor: torch.Tensor) -> None:
        if self.kind == "param":
            self.owner._parameters[self.attr].data = tensor
        elif self.kind == "buffer":
            self.owner._buffers[self.attr] = tensor
        else:
            setattr(self.owner, self.attr, tensor)


def layer_tensor_refs(module: nn.Module) -> dict[str, TensorRef]:
    """Every tensor a module computes with, by a stable name; bitsandbytes quant states
    (absmax, code, offset, nested state2) included, since they are weights too."""
    refs: dict[str, TensorRef] = {}
    for mod_name, mod in module.named_modules():
        refs.update(_own_tensor_refs(mod, f"{mod_name}." if mod_name else ""))
    return refs


def _own_tensor_refs(mod: nn.Module, prefix: str) -> dict[str, TensorRef]:
    refs: dict[str, TensorRef] = {}
    for name, param in mod._parameters.items():
        if param is None:
            continue
        refs[prefix + name] = TensorRef(mod, name, "param")
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            _quant_state_refs(quant_state, f"{prefix}{name}.quant_state", refs)
    for name, buf in mod._buffers.items():
        if buf is not None:
            refs[prefix + name] = TensorRef(mod, name, "buffer")
    return refs


def _quant_state_refs(quant_state, prefix: str, refs: dict[str, TensorRef]) -> None:
    for attr, value in vars(quant_state).items():
        if isinstance(value, torch.Tensor):
            refs[f"{prefix}.{attr}"] = TensorRef(quant_state, attr, "attr")
        elif attr == "state2" and value is not None:
            _quant_state_refs(value, f"{prefix}.state2", refs)


def module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Parameters, buffers and quant-state tensors reachable from a module."""
    for ref in layer_tensor_refs(module).values():
        yield ref.get()


def tensor_bytes(tensors, device: torch.device | str | None = None, seen: set | None = None) -> int:
    """Bytes held by the distinct storages behind `tensors` (on `device` if given).

    Each storage is counted once, whole: a view keeps its entire storage alive. `seen`: the
    storages counted already (updated), to split one count into parts.
    """
    device = torch.device(device) if device is not None else None
    seen = set() if seen is None else seen
    total = 0
    for tensor in tensors:
        if device is not None and tensor.device.type != device.type:
            continue
        storage = tensor.untyped_storage()
        key = _storage_key(tensor)
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def weight_breakdown(model: nn.Module, device: torch.device | str) -> dict[str, int]:
    """Bytes of the weights resident on `device`, by part: the input embedding, the output head,
    the decoder layers in the model (an offloaded layer's stub holds none), and the rest (norms,
    rotary tables). Each storage is counted once, in that order: a head tied to the embedding
    adds nothing of its own. The parts sum to tensor_bytes(module_tensors(model), device)."""
    def get(getter: str) -> list[nn.Module]:
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            return []
        return [module] if module is not None else []
    try:
        layers = list(find_decoder_layers(model))
    except ValueError:
        layers = []
    seen: set = set()
    parts = (("embedding_bytes", get("get_input_embeddings")), ("head_bytes", get("get_output_embeddings")),
             ("resident_layers_bytes", layers), ("other_bytes", [model]))
    return {name: tensor_bytes((t for m in modules for t in module_tensors(m)), device, seen)
            for name, modules in parts}


# bitsandbytes' AVX512-BF16 layout tiles a weight's N output rows 32 at a time and regroups its
# absmax per row of K / blocksize blocks (_convert_weight_packed_for_cpu asserts the first and
# fails on the second). Its forward converts every weight it may, without that check.
CPU_PACK_BLOCK_N = 32


def cpu_packable(quant_state) -> bool:
    """Whether bitsandbytes' fused AVX512-BF16 CPU kernel accepts this NF4 weight's shape."""
    shape = tuple(quant_state.shape)
    return len(shape) == 2 and shape[0] % CPU_PACK_BLOCK_N == 0 and shape[1] % quant_state.blocksize == 0


def prepack_nf4_for_cpu(module: nn.Module) -> None:
    """Repack bitsandbytes NF4 weights into the AVX512-BF16 CPU layout now.

    bitsandbytes does this itself on the first CPU forward (and undoes it, lossily, in
    state_dict()). Doing it before a layer is stored makes the stored form the computed
    form: a reload is a plain copy, and the result is what the first forward would make.
    A weight the fused kernel cannot take (an output size that is no multiple of 32, say a
    head over an odd vocabulary) is marked to stay unpacked: bitsandbytes then dequantises it
    on every forward, as it does on a CPU without AVX512-BF16, instead of failing an
    assertion in its first forward.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for mod in module.modules():
        if not isinstance(mod, Linear4bit) or not getattr(mod, "support_avx512bf16_for_cpu", False):
            continue
        quant_state = mod.weight.quant_state
        if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
            continue
        if cpu_packable(quant_state):
            mod.weight.data, mod.weight.quant_state = _convert_weight_packed_for_cpu(mod.weight.data, quant_state)
        else:
            mod.support_avx512bf16_for_cpu = False


# --------------------------------------------------------------------------- layer files

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset inside the data section
    end: int


@dataclass(frozen=True)
class Layout:
    """Where a layer file's tensors sit: the data section is read whole into one flat
    uint8 buffer and each tensor is a view into it, so a load is one read (and on CUDA one
    host-to-device copy) into memory that is reused. On a CPU the flat tensor may instead be
    the data section of the mapped file (LayerMaps): the same views, no read."""
    header_bytes: int  # 8-byte length prefix + JSON header (padded)
    data_bytes: int
    entries: dict[str, TensorEntry]

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + self.data_bytes

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: flat[e.start:e.end].view(e.dtype).view(e.shape) for name, e in self.entries.items()}

    def spec(self) -> dict[str, dict]:
        return {name: {"dtype": _DTYPE_CODES[e.dtype], "shape": list(e.shape)} for name, e in self.entries.items()}


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def serialize_layer(tensors: dict[str, torch.Tensor]) -> tuple[Layout, list]:
    """A safetensors file whose tensors all start on ALIGN_BYTES boundaries.

    safetensors forbids holes in the data section, so the gaps are filled by explicit
    ``__pad__`` uint8 tensors: the file stays readable by any safetensors reader.
    Returns the layout (real tensors only) and the chunks to write, header first.
    """
    header: dict[str, dict] = {"__metadata__": {"format": FORMAT}}
    entries: dict[str, TensorEntry] = {}
    chunks: list = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_CODES:
            raise TypeError(f"tensor {name}: dtype {tensor.dtype} cannot be stored")
        pad = -offset % ALIGN_BYTES
        if pad:
            header[f"__pad__{len(chunks)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            chunks.append(bytes(pad))
            offset += pad
        data = _as_bytes(tensor)
        end = offset + data.nbytes
        header[name] = {"dtype": _DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, end]}
        entries[name] = TensorEntry(tensor.dtype, tuple(tensor.shape), offset, end)
        chunks.append(data)
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN_BYTES)  # spaces are legal JSON padding
    head = len(text).to_bytes(8, "little") + text
    return Layout(len(head), offset, entries), [head, *chunks]


def read_layout(path: Path) -> Layout:
    """Parse a layer file's header (cheap: no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad_file(path, f"truncated layer file ({size} bytes, no header)")
            n = int.from_bytes(prefix, "little")
            if n > size - 8:
                raise _bad_file(path, f"truncated layer file (header claims {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise _bad_file(path, "layer file is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad_file(path, f"corrupt layer file header ({err})") from None
    found = header.get("__metadata__", {}).get("format")
    if found != FORMAT:
        raise _bad_file(path, f"layer file format {found!r}, this version reads {FORMAT!r}")
    entries = {}
    data_bytes = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        data_bytes = max(data_bytes, end)
        if not name.startswith("__pad__"):
            entries[name] = TensorEntry(_CODE_DTYPES[meta["dtype"]], tuple(meta["shape"]), start, end)
    layout = Layout(8 + n, data_bytes, entries)
    if size != layout.file_bytes:
        raise _bad_file(path, f"truncated or overlong layer file ({size} bytes, header says {layout.file_bytes})")
    return layout


def _sha256(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path, block_bytes: int = 8 << 20) -> str:
    with open(path, "rb") as f:
        return _sha256(iter(lambda: f.read(block_bytes), b""))


def atomic_write(path: Path, chunks) -> None:
    """Write `chunks` (bytes) to `path` whole or not at all: a temporary name beside it, fsync, os.replace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the store

def model_fingerprint(model: nn.Module, device: torch.device) -> tuple[str, dict]:
    """A short hash of what determines the stored bytes: model name, config, quantisation and
    the device type (the CPU computes NF4 from a different packing than CUDA)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k != "transformers_version"}
    quant = getattr(model.config, "quantization_config", None)
    identity = {
        "format": FORMAT,
        "model": str(getattr(model, "name_or_path", "") or model.config._name_or_path),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "dtype": str(next(model.parameters()).dtype if quant is None else "nf4/" + str(getattr(quant, "bnb_4bit_quant_type", "?"))),
        "device_type": device.type,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16], identity


@dataclass
class SyncProgress:
    """How far a LayerStore.sync() in progress has got: files stored (written or reused) of total."""
    total: int | None
    done: int = 0


# the layer folders whose sync() is under way, and how far each has got: what a script
# interrupted (Ctrl-C) can tell its user was kept
SYNCING: dict[Path, SyncProgress] = {}


class LayerStore:
    """``<cache_dir>/<fingerprint>/layer_<i>.safetensors`` plus ``manifest.json``.

    A file is reused only when the manifest's sha256 for it equals the sha256 of what this
    model would write now; a stale entry is rewritten. A reused file must hash to that value
    on disk, or a CacheError names it: a cache never silently feeds wrong weights.
    """

    def __init__(self, cache_dir: str | Path, fingerprint: str, identity: dict, cold: bool = False):
        self.dir = Path(cache_dir) / fingerprint
        self.identity = identity
        # cold: drop a file's pages from the page cache before each read, so its bytes come
        # from the storage device (what a model larger than RAM, or a cold start, sees).
        self.cold = cold
        self.manifest_path = self.dir / "manifest.json"
        self.layouts: dict[int, Layout] = {}
        self.written: list[int] = []  # layers written (not reused) by the last sync()
        self.peak_bytes = 0  # store_layers: the most weight bytes on the device while it stored them
        self._fds: dict[int, int] = {}   # open layer files, for read_into
        self._files: list = []           # per-thread file objects where os.preadv is missing
        self._local = threading.local()
        self._files_lock = threading.Lock()

    def path(self, key: int | str) -> Path:
        """A decoder layer's file (int key) or a named one (EMBEDDING)."""
        return self.dir / (f"layer_{key}.safetensors" if isinstance(key, int) else f"{key}.safetensors")

    def read_manifest(self) -> dict:
        """The manifest as stored, or {} when there is none or it is another identity's."""
        if not self.manifest_path.exists():
            return {}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CacheError(f"{self.manifest_path}: corrupt manifest ({err}); delete {self.dir} to rebuild") from None
        return manifest if manifest.get("identity") == self.identity else {}

    def sync(self, layers, total: int | None = None, progress: bool = True, written_with: dict | None = None) -> None:
        """Make the files for `layers` exist and match them: a dict index -> named tensors, or an
        iterable of (index, named tensors) pairs, consumed one at a time (`total`: their count,
        for the progress bar). `written_with` (an OffloadConfig's record()) goes into the
        manifest when this writes it: what the run that wrote the files asked for."""
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.read_manifest()
        entries = manifest.get("layers", {})
        self.written = []
        items = layers.items() if isinstance(layers, dict) else layers
        # until the last file is listed: an interrupted sync stays here, for the script to report what it kept
        SYNCING[self.dir] = SyncProgress(total=len(layers) if isinstance(layers, dict) else total)
        for index, tensors in _progress(items, "storing offloaded layers", progress, total):
            layout, chunks = serialize_layer(tensors)
            expected = _sha256(chunks)
            path = self.path(index)
            entry = entries.get(str(index))
            if entry is not None and entry["sha256"] == expected:
                self._verify(path, entry)
            else:
                atomic_write(path, chunks)
                self.written.append(index)
                entries[str(index)] = {
                    "file": path.name, "size_bytes": layout.file_bytes, "sha256": expected,
                    "tensors": layout.spec(),
                }
                # listed at once: an interrupted sync keeps what it wrote, the next one adds the rest
                self._write_manifest(entries, written_with)
            self.layouts[index] = layout
            SYNCING[self.dir].done += 1
        if not manifest:
            self._write_manifest(entries, written_with)
        del SYNCING[self.dir]

    def _write_manifest(self, entries: dict, written_with: dict | None) -> None:
        manifest = {"identity": self.identity, "layers": entries}
        if written_with is not None:
            manifest["written_with"] = written_with
        atomic_write(self.manifest_path, [json.dumps(manifest, indent=1, sort_keys=True).encode()])

    def open_existing(self, keys) -> bool:
        """Adopt the stored files for `keys` without the tensors that made them (what they hold is
        pinned by the identity): True if the manifest has this identity and every one of them,
        each checked against its size and sha256 (a bad one is a CacheError naming it); False
        if any is not listed, so the caller writes them with sync()."""
        entries = self.read_manifest().get("layers", {})
        if any(str(key) not in entries for key in keys):
            return False
        for key in keys:
            path = self.path(key)
            self._verify(path, entries[str(key)])
            self.layouts[key] = read_layout(path)
        return True

    @staticmethod
    def _verify(path: Path, entry: dict) -> None:
        if not path.exists():
            raise _bad_file(path, "layer file is missing (listed in the manifest)")
        size = path.stat().st_size
        if size != entry["size_bytes"]:
            raise _bad_file(path, f"truncated layer file ({size} bytes, manifest says {entry['size_bytes']})")
        if file_sha256(path) != entry["sha256"]:
            raise _bad_file(path, "corrupt layer file (sha256 differs from the manifest)")

    def read_into(self, index: int | str, out: torch.Tensor, start: int = 0) -> None:
        """Read file `index`'s data section from byte `start` into the host uint8 tensor `out`:
        all of the rest if `start` is 0 (into out's first bytes), else len(out) bytes (a chunk).

        The file stays open until close(): a positional read per load, no open/seek, and safe
        from two threads. Its size is checked on every read, so truncation is caught.
        """
        layout = self.layouts[index]
        fd = self.open_checked(index, cold=start == 0)
        n = layout.data_bytes if start == 0 else len(out)
        if start + n > layout.data_bytes:
            raise ValueError(f"bytes {start}..{start + n} are past the {layout.data_bytes}-byte data section")
        self._read_exact(index, fd, memoryview(out.numpy())[:n], layout.header_bytes + start)

    def read_host(self, key: int | str) -> torch.Tensor:
        """File `key`'s data section, read into a new host uint8 tensor."""
        flat = torch.empty(self.layouts[key].data_bytes, dtype=torch.uint8)
        self.read_into(key, flat)
        return flat

    def read_rows(self, key: int | str, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (distinct, ascending, CPU int64) of the one 2-D tensor in file `key`, as a
        new host tensor: one positional read per run of adjacent rows, nothing else is read."""
        layout = self.layouts[key]
        (entry,) = layout.entries.values()
        n_rows, width = entry.shape
        row_bytes = (entry.end - entry.start) // n_rows
        out = torch.empty((len(rows), width), dtype=entry.dtype)
        if not len(rows):
            return out
        fd = self.open_checked(key)
        target = memoryview(out.view(-1).view(torch.uint8).numpy())
        # Runs of consecutive ids: where the step to the next row is not 1, a new read starts.
        breaks = (torch.nonzero(rows.diff() != 1).flatten() + 1).tolist()
        for begin, end in zip([0, *breaks], [*breaks, len(rows)]):
            first = int(rows[begin])
            self._read_exact(key, fd, target[begin * row_bytes:end * row_bytes],
                             layout.header_bytes + entry.start + first * row_bytes)
        return out

    def open_checked(self, key: int | str, cold: bool = True) -> int:
        """The open file, its size checked against the layout (and dropped from the page cache if
        cold: once per read of a file, not per chunk)."""
        layout = self.layouts[key]
        fd = self._fd(key)
        size = os.fstat(fd).st_size
        if size != layout.file_bytes:
            raise _bad_file(self.path(key), f"truncated layer file ({size} bytes, expected {layout.file_bytes})")
        if self.cold and cold:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return fd

    def _read_exact(self, key: int | str, fd: int, target: memoryview, offset: int) -> None:
        got = 0
        while got < target.nbytes:
            n = self._pread(key, fd, target[got:], offset + got)
            if not n:
                raise _bad_file(self.path(key), f"truncated layer file (read {got} of {target.nbytes} bytes "
                                                f"at offset {offset})")
            got += n

    def _pread(self, index: int | str, fd: int, target: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):  # a positional read: no shared file position between threads
            return os.preadv(fd, [target], offset)
        # Windows has no preadv: a file object per thread keeps seek + readinto from racing.
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = {}
        f = files.get(index)
        if f is None:
            f = files[index] = open(self.path(index), "rb", buffering=0)
            with self._files_lock:
                self._files.append(f)
        f.seek(offset)
        return f.readinto(target)

    def _fd(self, index: int | str) -> int:
        fd = self._fds.get(index)
        if fd is None:
            try:
                fd = os.open(self.path(index), os.O_RDONLY)
            except FileNotFoundError:
                raise _bad_file(self.path(index), "layer file is missing") from None
            if self._fds.setdefault(index, fd) != fd:  # the other thread opened it first
                os.close(fd)
                fd = self._fds[index]
        return fd

    def close(self) -> None:
        """Close the files read_into keeps open."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        with self._files_lock:
            files, self._files = self._files, []
        for f in files:
            f.close()
        self._local = threading.local()

    def __del__(self):
        # no module globals here (contextlib, os): at interpreter exit they may be None already
        try:
            self.close()
        except Exception:
            pass


def _progress(items, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    if total is None:
        items = list(items)
        total = len(items)
    return tqdm(items, desc=desc, unit="layer", total=total, leave=False, disable=total < 2)


def release_cached_memory(device: torch.device) -> None:
    """Hand freed memory back: the CUDA allocator's cache, or on a CPU the freed heap."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        trim_host_memory()


def trim_host_memory() -> None:
    """Hand freed heap pages back to the OS, so a process's RSS shows what was released."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


# --------------------------------------------------------------------------- stubs

class _StandIn(nn.Module):
    """A module that stands in for `original` (kept as a plain attribute: not a submodule, so
    state_dict()/to() never touch it) and falls back to its attributes, so code that inspects
    ``model.model.layers[i].self_attn.layer_idx`` or ``embed_tokens.num_embeddings`` still
    sees the real values."""

    def __init__(self, controller: "OffloadController", original: nn.Module):
        super().__init__()
        self.__dict__["_controller"] = controller
        self.__dict__["_original"] = original

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:  # half-built (copy, unpickling): no fallback yet
                raise
            return getattr(original, name)


class OffloadedLayer(_StandIn):
    """Stands in for decoder layer `index` in the model's layer list; its weights are on disk."""

    def __init__(self, controller: "OffloadController", index: int, layer: nn.Module):
        super().__init__(controller, layer)
        self.index = index

    def forward(self, hidden_states, *args, **kwargs):
        return self._controller.on_stub(self.index, hidden_states, args, kwargs)

    def extra_repr(self) -> str:
        return f"index={self.index}, offloaded"


class OffloadedEmbedding(_StandIn):
    """Stands in for the input embedding; its weight is on disk and a forward reads only the
    rows of the tokens it is given."""

    def __init__(self, controller: "OffloadController", rows: "EmbeddingRows"):
        embedding = rows.module
        super().__init__(controller, embedding)
        self.__dict__["_entry"] = rows.entry
        # Its buffers (Gemma 3's embed_scale) stay resident: registered here too, non-persistent,
        # so the byte counts, which walk submodules, still see them.
        for name, buffer in embedding._buffers.items():
            if buffer is not None:  # (register_buffer would see the name through the fallback)
                self._buffers[name] = buffer
                self._non_persistent_buffers_set.add(name)

    def forward(self, input_ids):
        return self._controller.on_embedding(input_ids)

    def extra_repr(self) -> str:
        entry = self._entry
        return f"{entry.shape[0]} x {entry.shape[1]} {entry.dtype}, rows read from disk"


_LAYER_PATHS = ("model.layers", "model.language_model.layers", "layers")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in _LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(
        f"unsupported model {type(model).__name__}: expected its decoder layers in an nn.ModuleList "
        f"at one of {', '.join('model.' + p for p in _LAYER_PATHS)}")


# --------------------------------------------------------------------------- reading layers into buffers

def fit_budget(layer_bytes: dict[int, int], budget_bytes: int) -> set[int]:
    """Layers that stay resident under `budget_bytes`: the first ones, in forward order, that fit."""
    keep, used = set(), 0
    for i in sorted(layer_bytes):
        if used + layer_bytes[i] <= budget_bytes:
            keep.add(i)
            used += layer_bytes[i]
    return keep


def throttle_delay_s(nbytes: int, io_bandwidth: float | None, elapsed_s: float) -> float:
    """How long a read of `nbytes` that took `elapsed_s` must still wait to look like storage
    of `io_bandwidth` bytes/s (None: no throttle)."""
    if not io_bandwidth:
        return 0.0
    return max(0.0, nbytes / io_bandwidth - elapsed_s)


# Pinned host memory for reads to a CUDA device: two chunks of this size, whatever the layer size
# (an 8B bf16 layer is ~0.4 GB; one staging buffer per slot of that size would lock GBs of RAM).
STAGING_CHUNK_BYTES = 64 << 20


def staging_chunk_bytes(layer_bytes: dict[int, int], chunk_bytes: int = STAGING_CHUNK_BYTES) -> int:
    """The size of each of the two staging chunks: STAGING_CHUNK_BYTES, or the power of two
    that holds the largest layer when that is smaller (PyTorch's pinned allocator rounds up to
    powers of two, so this is what it holds). Pinned host memory is at most 2 x
    STAGING_CHUNK_BYTES (128 MiB), whatever the layer size."""
    return min(chunk_bytes, 1 << (max(layer_bytes.values()) - 1).bit_length())


class Staging:
    """Two host buffers of `chunk_bytes`, shared by every read to the device. A layer's data
    section is read chunk by chunk into them in turn; each chunk is copied to the device on
    `stream` (asynchronously from pinned memory on CUDA), and a buffer is refilled only after
    its previous copy completed (its event), so reading the next chunk overlaps copying this
    one. Bounded by 2 x chunk_bytes; released with the object (standby()). On a CPU device
    the same path runs with plain buffers and synchronous copies (tests use it)."""

    def __init__(self, chunk_bytes: int, device: torch.device):
        cuda = device.type == "cuda"
        self.chunk_bytes = chunk_bytes
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.events: list = [None, None]  # CUDA: the last copy out of each buffer
        self._next = 0
        self._lock = threading.Lock()  # the reader thread and kept-layer reads take turns

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def read(self, store: "LayerStore", i: int, flat: torch.Tensor, stream=None, copy_events=None) -> None:
        n = store.layouts[i].data_bytes
        with self._lock:
            for start in range(0, n, self.chunk_bytes):
                k, self._next = self._next, self._next ^ 1
                if self.events[k] is not None:
                    self.events[k].synchronize()
                chunk = self.buffers[k][:min(self.chunk_bytes, n - start)]
                store.read_into(i, chunk, start)
                if stream is None:  # CPU
                    flat[start:start + len(chunk)].copy_(chunk)
                    continue
                with torch.cuda.stream(stream):
                    # a pair per chunk: the device time of the copies, not of the reads between them
                    # (the host already counts those)
                    begin = _timing_event(stream.device, stream)
                    flat[start:start + len(chunk)].copy_(chunk, non_blocking=True)
                    self.events[k] = _timing_event(stream.device, stream)
                if copy_events is not None:
                    copy_events.append((begin, self.events[k]))


def _timing_event(device: torch.device, stream=None):
    """A CUDA event with timing, recorded now on `stream` (the current one if None)."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream if stream is not None else torch.cuda.current_stream(device))
    return event


def read_layer(store: LayerStore, i: int, flat: torch.Tensor, staging: Staging | None,
               io_bandwidth: float | None, copy_stream=None, copy_events: list | None = None) -> float:
    """Read layer `i` into the device buffer `flat`; returns the seconds spent.

    Without staging (CPU) the file is read straight into `flat`. With it (CUDA) it goes through
    the staging chunks, copied asynchronously on `copy_stream` (the current stream if None);
    the caller orders those copies against compute with events, and `copy_events` gets their
    (start, end) timing events. Returns the host's seconds. The throttle sleeps, so an
    emulated slow disk costs time but no CPU.
    """
    start = time.perf_counter()
    n = store.layouts[i].data_bytes
    if staging is None:
        store.read_into(i, flat)
    else:
        stream = copy_stream or (torch.cuda.current_stream(flat.device) if flat.device.type == "cuda" else None)
        staging.read(store, i, flat, stream, copy_events)
    delay_s = throttle_delay_s(n, io_bandwidth, time.perf_counter() - start)
    if delay_s > 0:  # even sleep(0) costs ~0.1 ms here: a syscall and a GIL hand-off
        time.sleep(delay_s)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- counts

class Counters:
    """What a controller counts, handed to everything that reads layers: loads, loaded_bytes,
    load_s, wait_s and forward_s (``totals``), and the most resident bytes seen
    (``peak_bytes``). Thread-safe, since the reader thread counts too. On CUDA, device work is
    timed with event pairs, summed when the counts are read: no synchronisation inside a
    forward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict = {}
        self.peak_bytes = 0
        self.forward_events: list = []  # CUDA: (start, end) event pairs of forward calls
        self.copy_events: list = []     # CUDA: (start, end) event pairs of chunk copies
        self._forward_start = None
        self._lock = threading.Lock()
        self.reset(0)

    def count(self, key: str, seconds: float, **counts) -> None:
        with self._lock:
            self.totals[key] += seconds
            for name, n in counts.items():
                self.totals[name] += n

    def note_resident(self, nbytes: int) -> None:
        self.peak_bytes = max(self.peak_bytes, nbytes)

    def reset(self, resident_bytes: int) -> None:
        self.collect_device_times()
        with self._lock:
            self.totals.update(loads=0, loaded_bytes=0, load_s=0.0, wait_s=0.0, forward_s=0.0)
        self.peak_bytes = resident_bytes

    def collect_device_times(self) -> None:
        """Add the finished CUDA event pairs (forward calls, layer copies) to the totals."""
        for key, pairs in (("forward_s", self.forward_events), ("load_s", self.copy_events)):
            while pairs:
                start, end = pairs.pop(0)
                end.synchronize()
                self.count(key, start.elapsed_time(end) / 1000)

    def snapshot(self) -> dict:
        """loads, loaded_bytes, load_s (read time, reader thread included), wait_s (compute
        stalled waiting for a layer), forward_s (time inside model forward calls), overlap
        (share of the smaller of read and compute time that was hidden), peak_resident_bytes.
        On CUDA, device work is timed with CUDA events, not host enqueue: forward_s is the
        device time from a forward's start to its end, and load_s adds the device time of the
        host-to-device copies to the reads. With cpu_read="map" a load is mapping a file: the
        pages are read in when the forward first touches them, so that time (from the storage
        device with cold reads) is in forward_s, not in load_s."""
        self.collect_device_times()
        with self._lock:
            stats = dict(self.totals)
        compute_s = stats["forward_s"] - stats["wait_s"]
        hideable_s = min(stats["load_s"], compute_s)
        stats["overlap"] = max(0.0, 1.0 - stats["wait_s"] / hideable_s) if hideable_s > 0 else 0.0
        stats["peak_resident_bytes"] = self.peak_bytes
        return stats

    def time_forwards(self, model: nn.Module) -> list:
        """Hooks that time each forward of `model` into forward_s; returns their handles."""
        return [model.register_forward_pre_hook(self._forward_begins), model.register_forward_hook(self._forward_ends)]

    def _forward_begins(self, module, args) -> None:
        cuda = self.device.type == "cuda"
        self._forward_start = _timing_event(self.device) if cuda else time.perf_counter()

    def _forward_ends(self, module, args, output) -> None:
        if self._forward_start is None:
            return
        if self.device.type == "cuda":
            self.forward_events.append((self._forward_start, _timing_event(self.device)))
        else:
            self.count("forward_s", time.perf_counter() - self._forward_start)
        self._forward_start = None


# --------------------------------------------------------------------------- residency: how a layer comes back

class Residency(typing.Protocol):
    """Where an offloaded layer's bytes are while it computes. ``acquire(i)`` returns layer i's
    data section as a flat uint8 tensor on the device (the controller binds the layer's tensors
    to views of it), ``release(i)`` follows its compute, ``close()`` lets every layer go
    (standby), ``held_bytes`` is what it holds on the device now. Implementations:
    KeptBuffers, LayerStreamer, LayerMaps."""

    held_bytes: int

    def acquire(self, i: int) -> torch.Tensor: ...

    def release(self, i: int) -> None: ...

    def close(self) -> None: ...


class LayerReader:
    """Reads layer files into device buffers and counts each read: straight into the buffer
    on a CPU, through the pinned Staging chunks on CUDA, shared by every read (made at the
    first, kept until release_staging())."""

    def __init__(self, store: LayerStore, device: torch.device, io_bandwidth: float | None,
                 counters: Counters, layer_bytes: dict[int, int]):
        self.store, self.device, self.io_bandwidth, self.counters = store, device, io_bandwidth, counters
        self.layer_bytes = layer_bytes
        self.staging: Staging | None = None

    def read(self, i: int, flat: torch.Tensor, copy_stream=None) -> float:
        """Layer i into `flat`; on CUDA the copies are queued on `copy_stream` (the current stream
        if None). Returns the host's seconds, counted as a load."""
        if self.device.type == "cuda" and self.staging is None:
            self.staging = Staging(staging_chunk_bytes(self.layer_bytes), self.device)
        seconds = read_layer(self.store, i, flat, self.staging, self.io_bandwidth, copy_stream,
                             self.counters.copy_events)
        self.counters.count("load_s", seconds, loads=1, loaded_bytes=self.store.layouts[i].data_bytes)
        return seconds

    @property
    def staging_bytes(self) -> int:
        return self.staging.nbytes if self.staging is not None else 0

    def release_staging(self) -> None:
        if self.staging is None:
            return
        self.staging = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing still copies out of the chunks
            if hasattr(torch._C, "_host_emptyCache"):  # PyTorch caches freed pinned blocks too
                torch._C._host_emptyCache()


class KeptBuffers:
    """A buffer of each layer's own on the device, read at the layer's first acquire (compute
    waits for it) and kept until close(): session mode, the budget's layers in stream mode,
    and every layer inside unpatched(). On CUDA the copies are queued on the current stream,
    so compute that uses the layer runs after them with no host synchronisation; reading the
    next layer overlaps them (the staging chunks guard their own reuse)."""

    def __init__(self, reader: LayerReader):
        self.reader = reader
        self.buffers: dict[int, torch.Tensor] = {}

    @property
    def held_bytes(self) -> int:
        return sum(flat.numel() for flat in self.buffers.values())

    def acquire(self, i: int) -> torch.Tensor:
        flat = self.buffers.get(i)
        if flat is None:
            flat = torch.empty(self.reader.layer_bytes[i], dtype=torch.uint8, device=self.reader.device)
            self.reader.counters.count("wait_s", self.reader.read(i, flat))
            self.buffers[i] = flat
        return flat

    def release(self, i: int) -> None:
        pass  # kept until close()

    def close(self) -> None:
        self.buffers.clear()


class LayerStreamer:
    """Streams layers through `depth + 1` reusable device slots, reading `depth` ahead.

    `order` is the order the forward pass needs the streamed layers in; it wraps around,
    so while the last layers of one token compute, the first ones of the next are read.
    With depth 0 every read happens in the caller's thread, just in time. A background
    read that fails re-raises in the caller when that layer is needed. The slots (and on
    CUDA the copy stream) are made at the first acquire and dropped by close().
    """

    def __init__(self, reader: LayerReader, order: list[int], depth: int):
        self.reader, self.order, self.depth, self.device = reader, order, depth, reader.device
        self.position = {i: k for k, i in enumerate(order)}
        self.slots: list[torch.Tensor] = []
        self.jobs: dict[int, tuple[int, Future | None]] = {}  # layer -> (slot, pending read)

    @property
    def held_bytes(self) -> int:
        """Bytes of the slots (all of them held from the first read until close())."""
        return sum(slot.numel() for slot in self.slots)

    def acquire(self, i: int) -> torch.Tensor:
        if not self.slots:
            self._open()
        if i not in self.jobs:  # not read ahead: first use, or an order we did not foresee
            self._drain()
            self._start(i, background=False)
        slot, job = self.jobs[i]
        if job is not None:
            start = time.perf_counter()
            try:
                job.result()
            except BaseException:  # a failed read, or an interrupt (KeyboardInterrupt) while waiting
                self.jobs.pop(i)
                self._free_when_done(slot, job)
                raise
            finally:
                self.reader.counters.count("wait_s", time.perf_counter() - start)
        if self.copied[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        self._read_ahead(i, self.depth)
        return self.slots[slot]

    def release(self, i: int) -> None:
        slot, _ = self.jobs.pop(i)
        if self.device.type == "cuda":
            self.freed[slot] = torch.cuda.current_stream(self.device).record_event()
        self.free_slots.append(slot)
        # the next layer is now the one being waited for: read `depth` beyond it
        self._read_ahead(i, self.depth + 1)

    def close(self) -> None:
        if not self.slots:
            return
        self._drain()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.slots, self.copy_stream, self.pool = [], None, None

    def _open(self) -> None:
        slot_bytes = max(self.reader.layer_bytes[i] for i in self.order)
        n_slots = min(self.depth + 1, len(self.order))  # more slots than streamed layers would only hold memory
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        for slot in self.slots if cuda else ():  # written on copy_stream: freed only once its copies are done
            slot.record_stream(self.copy_stream)
        self.copied = [None] * n_slots  # CUDA events: slot's copy done
        self.freed = [None] * n_slots   # CUDA events: compute done with the slot's previous layer
        self.free_slots = collections.deque(range(n_slots))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="layer-reader") if self.depth else None

    def _read_ahead(self, i: int, steps: int) -> None:
        """Start reads for the `steps` layers after `i` in forward order, while slots are free."""
        if self.pool is None:
            return
        k = self.position[i]
        for step in range(1, steps + 1):
            j = self.order[(k + step) % len(self.order)]
            if j in self.jobs:
                continue
            if not self.free_slots:
                break
            self._start(j, background=True)

    def _start(self, i: int, background: bool) -> None:
        slot = self.free_slots.popleft()
        if background:
            self.jobs[i] = (slot, self.pool.submit(self._read, i, slot))
        else:
            try:
                self.reader.counters.count("wait_s", self._read(i, slot))  # compute waits for all of it
            except BaseException:  # nothing writes into the slot any more; a half-read layer is not kept
                self.free_slots.appendleft(slot)
                raise
            self.jobs[i] = (slot, None)

    def _read(self, i: int, slot: int) -> float:
        if self.freed[slot] is not None:
            self.copy_stream.wait_event(self.freed[slot])
        seconds = self.reader.read(i, self.slots[slot], self.copy_stream)
        if self.copy_stream is not None:
            self.copied[slot] = self.copy_stream.record_event()
        return seconds

    def _free_when_done(self, slot: int, job: Future) -> None:
        """Give a slot back only once no read can still be writing into it: an interrupted wait
        leaves the reader filling the slot, and reusing it then would corrupt another layer."""
        if job.cancel() or job.done():
            self.free_slots.append(slot)
        else:
            job.add_done_callback(lambda _: self.free_slots.append(slot))

    def _drain(self) -> None:
        for i, (slot, job) in list(self.jobs.items()):
            if job is not None and not job.cancel():
                with contextlib.suppress(Exception):  # re-raised if that layer is asked for
                    job.result()
            self.free_slots.append(slot)
        self.jobs.clear()


# --------------------------------------------------------------------------- mapped layers (CPU)

CPU_READS = ("map", "copy")  # patch_model's cpu_read: how a CPU brings a layer in
RUNS = ("parallel", "sequential")  # OffloadConfig.runs: how a run of adjacent offloaded layers computes


class LayerMaps:
    """A CPU's way to bring layers in without a copy: each layer's tensors are views of a
    private mapping of its file. On a CPU the "device" is host memory and a layer file in use
    sits in the page cache, so a read would copy bytes that are in memory already; a view
    computes on the cached pages themselves (as llama.cpp does with its GGUF). The controller
    keeps a mapping from the layer's first use until standby(): unmapping it after each compute
    and mapping it again at the next token faults every page in again, which costs about as
    much as the copy. So, unlike LayerStreamer, its release() keeps the mapping: acquire(i) ->
    the layer's data section as a flat uint8 tensor (a new mapping counted as a load),
    close() at standby, held_bytes; the caller binds the views and must unbind them before
    close().

    The mapping is private and writable (mmap's ACCESS_COPY: MAP_PRIVATE, PROT_READ |
    PROT_WRITE on POSIX): torch.frombuffer wants a writable buffer, and should anything write
    to a weight the kernel gives it a private copy of that page, so nothing reaches the file.
    The data section and every tensor start on ALIGN_BYTES boundaries of the file and a
    mapping starts on a page, so the views are as aligned as a read buffer's.

    A file must not shrink under its mapping: touching a page past its end is SIGBUS, a
    crash, not an exception. The store replaces a file only by an atomic rename, which leaves
    a mapped inode as it was; and a file's size is checked against its layout when it is
    mapped and again (fstat, cheap) whenever a live mapping is handed out, that is before each
    forward that computes with it, so a truncated file is a CacheError naming it. What no
    check can prevent: another process truncating the file in place between that check and
    the access.

    The views hold a memoryview of the mapping, whose buffer export lives as long as they do
    (torch.frombuffer itself keeps only a reference to the object it was given, and an mmap
    closed under it would leave tensors pointing at unmapped memory). So closing a mapping
    that a tensor still views raises BufferError instead: then the mapping stays until that
    tensor is freed (a view held outside the model, an autograd graph), with a warning.

    Read-ahead (`depth` > 0): acquiring a streamed layer (one in `order`) advises the kernel
    (posix_fadvise WILLNEED) to read the next `depth` of `order` into the page cache in the
    background; nothing is copied or held. Cold reads are the copy path's (patch_model refuses
    cold with map: a mapping is read once and kept).
    """

    def __init__(self, store: LayerStore, order: list[int], depth: int, counters: Counters):
        self.store, self.order, self.depth, self.counters = store, order, depth, counters
        self.position = {i: k for k, i in enumerate(order)}
        self._live: dict[int, tuple[mmap.mmap, torch.Tensor]] = {}  # layer -> (mapping, its data section)
        self._advised: set[int] = set()  # read ahead, not mapped since

    def __contains__(self, i: int) -> bool:
        return i in self._live

    @property
    def held_bytes(self) -> int:
        """Bytes of the data sections mapped now, as a buffer of each would hold."""
        return sum(flat.numel() for _, flat in self._live.values())

    def regions(self) -> dict[int, tuple[int, int]]:
        """(address, bytes) of each mapped data section: where the views of the layer point."""
        return {i: (flat.data_ptr(), flat.numel()) for i, (_, flat) in self._live.items()}

    def acquire(self, i: int) -> torch.Tensor:
        live = self._live.get(i)
        if live is None:  # a new mapping counts as a load; compute waits for it
            start = time.perf_counter()
            flat = self._map(i)
            seconds = time.perf_counter() - start
            self.counters.count("load_s", seconds, loads=1, loaded_bytes=flat.numel())
            self.counters.count("wait_s", seconds)
        else:
            self._check(i, live[0])
            flat = live[1]
        if i in self.position:
            self._read_ahead(i)
        return flat

    def release(self, i: int) -> None:
        pass  # mapped until close()

    def close(self) -> None:
        live, self._live = self._live, {}
        self._advised.clear()
        for i in list(live):
            self._unmap(i, live.pop(i)[0])  # no name left holding the views: a live one would keep the mapping

    def _map(self, i: int) -> torch.Tensor:
        layout = self.store.layouts[i]
        fd = self.store.open_checked(i)  # checked against the layout here
        self._advised.discard(i)
        try:
            mapping = mmap.mmap(fd, layout.file_bytes, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as err:
            raise _bad_file(self.store.path(i), f"cannot map layer file ({err})") from None
        flat = torch.frombuffer(memoryview(mapping), dtype=torch.uint8, count=layout.data_bytes,
                                offset=layout.header_bytes)
        self._live[i] = (mapping, flat)
        return flat

    def _check(self, i: int, mapping: mmap.mmap) -> None:
        size, expected = mapping.size(), self.store.layouts[i].file_bytes  # size(): fstat of the mapped inode
        if size != expected:
            problem = "truncated" if size < expected else "overlong"
            raise _bad_file(self.store.path(i), f"{problem} layer file ({size} bytes, expected {expected}) "
                                                "under its mapping")

    def _unmap(self, i: int, mapping: mmap.mmap) -> None:
        try:
            mapping.close()
        except BufferError:  # dropped here; munmap happens when the last view goes
            warnings.warn(f"layer {i}: a tensor outside the model still views its mapped file {self.store.path(i)}; "
                          "its pages stay mapped until that tensor is freed", stacklevel=3)

    def _read_ahead(self, i: int) -> None:
        if not self.depth or not hasattr(os, "posix_fadvise"):
            return
        k = self.position[i]
        for step in range(1, min(self.depth, len(self.order)) + 1):
            j = self.order[(k + step) % len(self.order)]
            if j in self._live or j in self._advised:
                continue
            try:
                fd = self.store.open_checked(j)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except (CacheError, OSError):
                continue  # advice only: mapping the layer names its file's problem
            self._advised.add(j)


# --------------------------------------------------------------------------- the embedding

class EmbeddingRows:
    """The input embedding while its weight is on disk: a forward reads only the rows of the
    tokens it is given, and the whole weight can be put back. The module is kept, so a restored
    embedding is the model's own (a scaled one stays scaled)."""

    def __init__(self, model: nn.Module, embedding: nn.Module, store: "LayerStore"):
        self.module, self._store = embedding, store
        self._ref = TensorRef(embedding, "weight", "param")
        self.entry = store.layouts[EMBEDDING].entries["weight"]
        self._device = embedding.weight.device
        self._slot = _parent_slot(model, embedding)

    @property
    def file_bytes(self) -> int:
        return self._store.layouts[EMBEDDING].data_bytes

    def stand_in(self, stub: nn.Module) -> None:
        """Put `stub` in the embedding's place; the module's weight becomes a placeholder."""
        self._ref.set(_placeholder(self.entry.dtype, self._device))
        setattr(*self._slot, stub)

    def forward_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The module's own forward over a weight made of just the rows of the distinct ids in
        the batch, read from the file; ids renumbered to index it. The rows are the stored
        bytes, so the output equals the original's."""
        rows, inverse = torch.unique(input_ids.reshape(-1).cpu(), sorted=True, return_inverse=True)
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.entry.shape[0]):
            bad = int(rows[0] if rows[0] < 0 else rows[-1])
            raise IndexError(f"token id {bad} is out of range of the {self.entry.shape[0]}-row input embedding")
        weight = self._store.read_rows(EMBEDDING, rows).to(self._device)
        module = self.module
        # padding_idx indexes the full matrix; it only shapes gradients, and the renumbered
        # weight is smaller than it, which F.embedding would reject.
        padding_idx, module.padding_idx = module.padding_idx, None
        self._ref.set(weight)
        try:
            return module(inverse.view(input_ids.shape).to(input_ids.device))
        finally:
            module.padding_idx = padding_idx
            self._ref.set(_placeholder(self.entry.dtype, self._device))

    def restore(self, copy: bool = False) -> nn.Module:
        """Put the module back with its whole weight read from the file (in a storage of its own
        if `copy`); returns the stand-in it replaces."""
        flat = self._store.read_host(EMBEDDING)
        self._ref.set(self._store.layouts[EMBEDDING].views(flat)["weight"].to(self._device, copy=copy))
        stub = getattr(*self._slot)
        setattr(*self._slot, self.module)
        return stub


# --------------------------------------------------------------------------- configuration

MODES = ("session", "stream")


@dataclass(frozen=True)
class OffloadConfig:
    """How patch_model offloads, beyond the model, the layers and where their files go; checked
    once, here (what depends on the device: check_device()). Recorded in the layer files'
    manifest as ``written_with`` by the run that wrote them: the files' bytes do not depend on
    it (the fingerprint pins the model), so another config reuses them."""

    # a float, or {layer index: alpha} (layers not named get 1.0); a layer with alpha 0 is
    # removed: never read, never computed
    alpha: float | dict = 1.0
    # session: a layer stays on the device from its first use until standby(); stream: loaded
    # just before use and released right after, except those that fit budget_bytes, kept as in
    # a session
    mode: str = "session"
    # stream mode: layers a background thread reads ahead (0: none); with cpu_read="map", layers
    # the kernel is advised to read into the page cache ahead (no thread, no buffers)
    prefetch: int = 2
    budget_bytes: int = 0
    # stream mode: the offloaded layers kept resident from their first use until standby(),
    # named (a Plan's resident layers) instead of fitted to budget_bytes first-fit; None:
    # budget_bytes decides
    keep: tuple[int, ...] | None = None
    # bytes/s; reads throttled to emulate slower storage (None: as fast as it goes). A mapped
    # layer is not read, so on a CPU this needs cpu_read="copy"
    io_bandwidth: float | None = None
    # k: a run's contribution sum_i alpha_i (L_i(x) - x) is added before the k-th resident layer
    # after it instead of the next (each layer still computed from its own input x; k = 1 is
    # exact at alpha = 1; k > 1 is a different model, summed in fp32)
    inject_distance: int = 1
    # how a run of adjacent offloaded layers computes: "parallel", each layer from the run's input
    # x (x + sum_i alpha_i (L_i(x) - x): the original's method, a different model when a run has
    # two layers or more), or "sequential", each from the one before it (lerp(y, L_i(y), alpha_i)
    # in turn: at alpha = 1 exactly the original model, whatever layers are offloaded; a Plan's)
    runs: str = "parallel"
    # drop each layer file from the page cache before reading it (posix_fadvise DONTNEED), so
    # reads come from the storage device (Linux); a mapped layer is read once and kept, so on a
    # CPU this needs cpu_read="copy"
    cold: bool = False
    # also put the input embedding's weight in a file; a forward reads only its tokens' rows
    # (exact). A tied output head needs the whole matrix every forward: then it stays, with a
    # warning, and controller.embedding_residency says "tied"
    offload_embeddings: bool = False
    # offloaded layers a GPU computes on the host instead (llama.cpp's -ngl): read into host memory
    # and kept there, the hidden state (a few KB) crossing PCIe instead of the layer, its KV cache on
    # the host. Approximate: a CPU kernel rounds differently from a GPU one. On a CPU, where the
    # device is the host, the identity. bitsandbytes NF4 layers are refused (its CPU kernels want a
    # layout of their own)
    host_compute: tuple[int, ...] = ()
    # how a CPU brings a layer in: "map", views of a private copy-on-write mapping of its file
    # (LayerMaps: nothing copied, the pages are the page cache's), or "copy", read into a buffer
    # of its own or a stream slot. Ignored off a CPU: a GPU needs the bytes copied to it
    cpu_read: str = "map"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'session' or 'stream', got {self.mode!r}")
        if self.budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {self.budget_bytes}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.io_bandwidth is not None and self.io_bandwidth <= 0:
            raise ValueError(f"io_bandwidth must be > 0 bytes/s, got {self.io_bandwidth}")
        if self.cold and not hasattr(os, "posix_fadvise"):
            raise ValueError("cold reads need os.posix_fadvise, which this platform lacks (it is Linux/Unix only)")
        if not isinstance(self.inject_distance, int) or self.inject_distance < 1:
            raise ValueError(f"inject_distance must be a whole number >= 1, got {self.inject_distance!r}")
        if self.cpu_read not in CPU_READS:
            raise ValueError(f"cpu_read must be 'map' or 'copy', got {self.cpu_read!r}")
        if self.runs not in RUNS:
            raise ValueError(f"runs must be 'parallel' or 'sequential', got {self.runs!r}")
        if self.runs == "sequential" and self.inject_distance != 1:
            raise ValueError("runs='sequential' computes each layer from the one before it, and inject_distance > 1 "
                             "adds a run's contribution later: pick one")
        object.__setattr__(self, "host_compute", tuple(sorted(set(int(i) for i in self.host_compute))))
        if self.keep is not None:
            if self.mode != "stream" or self.budget_bytes:
                raise ValueError("keep names the layers a stream keeps: it needs mode='stream' and no budget_bytes "
                                 "(which would choose them too)")
            object.__setattr__(self, "keep", tuple(sorted(set(int(i) for i in self.keep))))

    def check_device(self, device: torch.device) -> None:
        """What a mapped layer cannot do, refused on a CPU with cpu_read="map"."""
        if device.type != "cpu" or self.cpu_read != "map":
            return
        if self.io_bandwidth is not None:
            raise ValueError("io_bandwidth throttles layer reads, and a mapped layer is not read: "
                             "pass cpu_read='copy' to emulate slower storage on a CPU")
        if self.cold:
            # a mapped layer's pages come from the disk once, then stay mapped until standby(): the
            # rest of the decode would read the page cache while the run says cold
            raise ValueError("cold reads drop a layer file's pages before each read, and a mapped layer is read once "
                             "and kept mapped until standby(): pass cpu_read='copy' for cold reads on a CPU")

    def alphas(self, offloaded: list[int]) -> dict[int, float]:
        """Each offloaded layer's alpha."""
        if isinstance(self.alpha, dict):
            unknown = sorted(set(self.alpha) - set(offloaded))
            if unknown:
                raise ValueError(f"alpha names layers that are not offloaded: {unknown}")
            return {i: float(self.alpha.get(i, 1.0)) for i in offloaded}
        return {i: float(self.alpha) for i in offloaded}

    def record(self) -> dict:
        """The fields as JSON values (an alpha dict's keys as strings)."""
        fields = dataclasses.asdict(self)
        if isinstance(self.alpha, dict):
            fields["alpha"] = {str(i): float(a) for i, a in sorted(self.alpha.items())}
        return fields


# --------------------------------------------------------------------------- the controller

@dataclass(frozen=True)
class Residencies:
    """Each offloaded layer's Residency, chosen once (from mode and budget: which layers are
    streamed; from the device: mapped or read): ``patched``, and the ones session() and
    unpatched() swap in for their block (``session``; ``copied``: the model as loaded, every
    layer in a buffer of its own)."""

    kept: KeptBuffers
    streamer: LayerStreamer | None  # None: nothing streamed, or mapped
    maps: LayerMaps | None          # a CPU with cpu_read="map"
    patched: dict[int, Residency]
    session: dict[int, Residency]
    copied: dict[int, Residency]
    host: KeptBuffers | None = None  # a GPU's host-computed layers, in host memory

    @classmethod
    def choose(cls, reader: LayerReader, layers: list[int], streamed: list[int], mapped: bool,
               prefetch: int, host: list[int] = ()) -> "Residencies":
        kept = KeptBuffers(reader)
        if mapped:
            maps = LayerMaps(reader.store, streamed, prefetch, reader.counters)
            return cls(kept, None, maps, dict.fromkeys(layers, maps), dict.fromkeys(layers, maps),
                       dict.fromkeys(layers, kept))
        streamer = LayerStreamer(reader, streamed, prefetch) if streamed else None
        patched = {i: streamer if i in streamed else kept for i in layers}
        session = dict.fromkeys(layers, kept)
        host_buffers = None
        if host:  # read into host memory (no staging: a CPU reader) and kept there
            host_buffers = KeptBuffers(LayerReader(reader.store, torch.device("cpu"), reader.io_bandwidth,
                                                   reader.counters, reader.layer_bytes))
            patched.update(dict.fromkeys(host, host_buffers))
            session.update(dict.fromkeys(host, host_buffers))
        return cls(kept, streamer, None, patched, session, dict.fromkeys(layers, kept), host_buffers)

    def all(self) -> list[Residency]:
        return [r for r in (self.kept, self.streamer, self.maps, self.host) if r is not None]

    def on_device(self) -> list[Residency]:
        """The residencies whose buffers are on the compute device (not the host's)."""
        return [r for r in (self.kept, self.streamer, self.maps) if r is not None]


class LayerTensors:
    """What moves of one offloaded layer: its tensor slots (parameters, buffers, quant states),
    bound to views of a flat buffer that holds its file's data section while it is on the
    device, and placeholders otherwise."""

    def __init__(self, module: nn.Module, layout: Layout, device: torch.device):
        self.module, self.layout, self.device = module, layout, device
        self.refs = layer_tensor_refs(module)
        self.bound: torch.Tensor | None = None  # the buffer the tensors view now

    def bind(self, flat: torch.Tensor) -> None:
        if self.bound is flat:  # same buffer, freshly read: the views are still right
            return
        for name, view in self.layout.views(flat).items():
            self.refs[name].set(view)
        self.bound = flat

    def unbind(self) -> None:
        self.bound = None
        for ref in self.refs.values():
            ref.set(_placeholder(ref.get().dtype, self.device))

    def restore(self, flat: torch.Tensor) -> nn.Module:
        """The module with its tensors back, each in a storage of its own, cloned from `flat`."""
        for name, view in self.layout.views(flat).items():
            self.refs[name].set(view.clone())
        self.bound = None
        return self.module

    def copy(self, flat: torch.Tensor | None) -> nn.Module:
        """The module on its own: a deep copy of its structure (never of bound bytes) with its
        tensors made from `flat` (None: placeholders)."""
        bound = {name: ref.get() for name, ref in self.refs.items()}
        for ref in self.refs.values():
            ref.set(_placeholder(ref.get().dtype, self.device))
        try:
            module = copy.deepcopy(self.module)
        finally:
            for name, ref in self.refs.items():
                ref.set(bound[name])
        if flat is not None:
            refs = layer_tensor_refs(module)
            for name, view in self.layout.views(flat).items():
                refs[name].set(view.to(self.device))  # on a CPU: views of `flat`, the copy's own buffer
        return module


class DeferredAdds:
    """inject_distance = k > 1: a run's contribution waits to be added before the k-th resident
    layer after it (None: fewer follow; added to the last layer's output, before the final
    norm), by hooks on those layers. With k = 1 it holds nothing and hooks nothing."""

    def __init__(self, model: nn.Module, layer_list: nn.ModuleList, offloaded: list[int], distance: int):
        self.targets = _injection_targets(len(layer_list), offloaded, distance)
        self.waiting: dict = collections.defaultdict(list)
        # what an interrupted forward left behind goes at the next one's start
        self.hooks = [model.register_forward_pre_hook(lambda module, args: self.waiting.clear())]
        if distance == 1:
            return
        for target in {t for t in self.targets.values() if t is not None}:
            self.hooks.append(layer_list[target].register_forward_pre_hook(
                functools.partial(self._add_before, target), with_kwargs=True))
        last = len(layer_list) - 1
        if last not in offloaded:  # an offloaded last layer's stub adds them itself
            self.hooks.append(layer_list[last].register_forward_hook(self._add_after))

    def defer(self, run_end: int, delta: torch.Tensor) -> None:
        self.waiting[self.targets[run_end]].append(delta)

    def add_final(self, x: torch.Tensor) -> torch.Tensor:
        return _add(x, self.waiting.pop(None))

    def _add_before(self, target: int, module, args, kwargs):
        deltas = self.waiting.pop(target, None)
        if not deltas:
            return None
        if args:
            return (_add(args[0], deltas), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _add(kwargs["hidden_states"], deltas)}

    def _add_after(self, module, args, output):
        deltas = self.waiting.pop(None, None)
        if not deltas:
            return None
        if isinstance(output, tuple):
            return (_add(output[0], deltas), *output[1:])
        return _add(output, deltas)


class OffloadController:
    """The offloaded layers' stubs, the injection of their contributions, and the public API
    (made by patch_model). Each layer's Residency is chosen once, here: KeptBuffers for those
    that stay (all in ``session`` mode, those that fit `budget_bytes` in ``stream`` mode), a
    LayerStreamer for the others; on a CPU with cpu_read="map" one LayerMaps for all (only
    file-backed pages, which the kernel may drop and read again). Counts: ``counters``."""

    def __init__(self, model: nn.Module, layers: list[int], store: LayerStore, config: OffloadConfig):
        layer_list = find_decoder_layers(model)
        self.model, self.store, self.config, self.offloaded_layers = model, store, config, list(layers)
        self.device = layer_device(model, layer_list[layers[0]])
        self.alphas = config.alphas(layers)
        # alpha = 0 is removal: lerp(x, L(x), 0) is x, so such a layer is never read or computed.
        self.skipped_layers = [i for i in layers if self.alphas[i] == 0]
        self.computed_layers = [i for i in layers if self.alphas[i] != 0]
        self.mode, self.prefetch, self.inject_distance = config.mode, config.prefetch, config.inject_distance
        self.layer_bytes = {i: store.layouts[i].data_bytes for i in layers}
        computed_bytes = {i: self.layer_bytes[i] for i in self.computed_layers}
        if config.keep is not None and not set(config.keep) <= set(layers):
            raise ValueError(f"keep names layers that are not offloaded: {sorted(set(config.keep) - set(layers))}")
        self.keep = set(layers) if config.mode != "stream" else set(config.keep) & set(self.computed_layers) \
            if config.keep is not None else fit_budget(computed_bytes, config.budget_bytes)
        # A GPU needs the bytes copied to it; a CPU computes on host memory, where the file's pages are.
        self.cpu_read = config.cpu_read if self.device.type == "cpu" else None
        self.layer_modules = {i: layer_list[i] for i in layers}  # the real modules, behind the stubs
        self.counters = Counters(self.device)
        self.reader = LayerReader(store, self.device, config.io_bandwidth, self.counters, self.layer_bytes)
        # on a CPU the device is the host: host compute is the identity
        self.host_layers = set(config.host_compute) if self.device.type != "cpu" else set()
        check_host_compute(config.host_compute, self.computed_layers, {i: layer_list[i] for i in self.host_layers})
        streamed = [i for i in self.computed_layers if i not in self.keep and i not in self.host_layers]
        self.residencies = Residencies.choose(self.reader, layers, streamed, self.cpu_read == "map", config.prefetch,
                                              host=sorted(self.host_layers))
        self._residency = self.residencies.patched  # session() and unpatched() swap in their own for the block
        self._layer_list, self._tensors = layer_list, {i: LayerTensors(layer_list[i], store.layouts[i], self.device)
                                                       for i in layers}
        self._run_start = {i for i in layers if i - 1 not in self.layer_modules}
        self._run_end = {i for i in layers if i + 1 not in self.layer_modules}
        self._pending, self._pending_input, self._patched, self._model_bytes = [], None, True, 0
        self._deferred = DeferredAdds(model, layer_list, layers, config.inject_distance)
        self._hooks = self.counters.time_forwards(model) + self._deferred.hooks
        self._embedding = self._stand_in(model, layer_list, store, config)
        self.standby()
        self.reset_stats()

    def _stand_in(self, model, layer_list, store, config) -> EmbeddingRows | None:
        """Put the stubs in the offloaded layers' (and an offloaded embedding's) places."""
        for i in self.offloaded_layers:
            self._tensors[i].unbind()
            layer_list[i] = OffloadedLayer(self, i, layer_list[i])
        # resident: not asked; disk: rows read per forward; tied: asked, but the head holds it.
        self.embedding_residency = ("disk" if EMBEDDING in store.layouts else "tied") if config.offload_embeddings \
            else "resident"
        if self.embedding_residency != "disk":
            return None
        rows = EmbeddingRows(model, model.get_input_embeddings(), store)
        rows.stand_in(OffloadedEmbedding(self, rows))
        return rows

    # ---- public API
    def residency(self, i: int) -> Residency:
        """Where layer i's bytes come from now."""
        return self._residency[i]

    def standby(self, release: bool = True) -> None:
        """Drop every offloaded layer from the device: only resident layers remain.

        release: also hand cached memory back (the CUDA allocator's cache, the pinned staging
        chunks, freed host heap). False keeps them for the next inference, so a timed run
        makes no allocator calls for buffers the previous one already had."""
        for tensors in self._tensors.values():  # first: a view still bound would keep its mapping
            tensors.unbind()
        for residency in self.residencies.all():
            residency.close()
        self.store.close()
        self._pending, self._pending_input = [], None
        self._deferred.waiting.clear()
        if release:
            self.release_staging()
            release_cached_memory(self.device)

    def release_staging(self) -> None:
        """Hand the pinned staging chunks back (made again by the next read); standby() does."""
        self.reader.release_staging()

    def staging_bytes(self) -> int:
        """Pinned host bytes held for reads now (0 on CPU and after standby())."""
        return self.reader.staging_bytes

    @contextlib.contextmanager
    def session(self, release: bool = True):
        """Load the offloaded layers that are computed (alpha != 0) on entry, keep them for the
        whole block, standby(release) on exit."""
        with self._residing(self.residencies.session, release):
            yield self

    @contextlib.contextmanager
    def unpatched(self, release: bool = True):
        """The original model for the block, nothing rewritten: every offloaded layer loaded
        (as in a session) and the real layer modules put back in the layer list; the stubs
        and standby(release) on exit. Lets a script time the resident model in the same process,
        interleaved with the patched one, without loading the model twice. Each layer is read
        into a buffer of its own even with cpu_read="map": the model as loaded holds its weights
        in anonymous memory, and that is what a same-run baseline measures and times."""
        with self._residing(self.residencies.copied, release):
            for i in self.skipped_layers:
                self._acquire(i)
            # the embedding first: if its file fails, the stubs are all still in place
            embedding_stub = self._embedding.restore() if self._embedding is not None else None
            stubs = {i: self._layer_list[i] for i in self.offloaded_layers}
            for i, module in self.layer_modules.items():
                self._layer_list[i] = module
            try:
                yield self.model
            finally:
                for i, stub in stubs.items():
                    self._layer_list[i] = stub
                if embedding_stub is not None:
                    self._embedding.stand_in(embedding_stub)

    @contextlib.contextmanager
    def _residing(self, residency: dict[int, Residency], release: bool):
        """`residency` for the block, the computed layers acquired on entry; standby(release) and
        the residency before it on exit."""
        before, self._residency = self._residency, residency
        try:
            for i in self.computed_layers:
                self._acquire(i)
            yield
        finally:
            self._residency = before
            self.standby(release)

    def layer_copy(self, i: int, tensors: bool = True) -> nn.Module:
        """Offloaded layer i as a module of its own, outside the controller: its stored tensors
        read from its file into fresh memory on the device (tensors=False: placeholders, the
        structure only). What a draft builds a resident substitute from."""
        return self._tensors[i].copy(self.store.read_host(i) if tensors else None)

    def layer_dtype(self) -> torch.dtype:
        """The dtype of the offloaded layers' largest tensor: their weights' (torch.uint8 for
        bitsandbytes NF4 codes, which compute in the layer's compute dtype)."""
        entries = [e for i in self.offloaded_layers for e in self.store.layouts[i].entries.values()]
        return max(entries, key=lambda e: e.end - e.start).dtype

    def read_bytes_per_forward(self) -> int:
        """Bytes of layer files one forward reads in stream mode: the computed layers not kept
        by the budget. (A session reads the computed layers once, on entry.)"""
        return sum(self.layer_bytes[i] for i in self.computed_layers
                   if self.mode != "stream" or (i not in self.keep and i not in self.host_layers))

    def offloaded_bytes(self) -> int:
        """Bytes unpatched() brings onto the device beyond standby: every offloaded layer (skipped
        ones too) and an offloaded embedding's whole matrix."""
        embedding = self._embedding.file_bytes if self._embedding is not None else 0
        return sum(self.layer_bytes.values()) + embedding

    def resident_breakdown(self) -> dict[str, int]:
        """resident_bytes() by part: weight_breakdown()'s parts and ``offloaded_buffer_bytes``
        (the offloaded layers' buffers that exist now); the parts sum to resident_bytes()."""
        return {**weight_breakdown(self.model, self.device), "offloaded_buffer_bytes": self.buffer_bytes()}

    def resident_bytes(self) -> int:
        """Bytes of weights and buffers on the compute device: the model's resident tensors
        (NF4 as packed data plus quant-state tensors) and the offloaded layers' buffers that
        exist now (buffer_bytes()). Each storage counted once."""
        self._model_bytes = tensor_bytes(module_tensors(self.model), self.device)
        return self._model_bytes + self.buffer_bytes()

    def buffer_bytes(self) -> int:
        """Bytes the residencies hold now: kept layers' own buffers, stream slots, and on a CPU
        with cpu_read="map" the data sections mapped now, counted as a buffer of each would be,
        though their pages are the page cache's and the kernel may drop them."""
        return sum(residency.held_bytes for residency in self.residencies.on_device())

    def host_bytes(self) -> int:
        """Bytes of the host-computed layers held in host memory now (0 on a CPU, where
        host_compute is the identity)."""
        return self.residencies.host.held_bytes if self.residencies.host is not None else 0

    def stats(self) -> dict:
        """loads, loaded_bytes, load_s, wait_s, forward_s, overlap and peak_resident_bytes (most
        resident_bytes() seen) since reset_stats(): Counters.snapshot()."""
        return self.counters.snapshot()

    def reset_stats(self) -> None:
        self.counters.reset(self.resident_bytes())

    def unpatch(self, restore: bool = True) -> nn.Module:
        """Put the original layers back, each tensor in a storage of its own; return the model.
        restore=False: back empty, as store_layers leaves them, for patch_model(..., store=) again."""
        self.standby()
        for i, tensors in self._tensors.items():
            if restore:
                flat = torch.empty(self.layer_bytes[i], dtype=torch.uint8, device=self.device)
                self.reader.read(i, flat)
                self._layer_list[i] = tensors.restore(flat)
            else:
                self._layer_list[i] = tensors.module
        if self._embedding is not None:
            self._embedding.restore(copy=True)
        self.store.close()
        self.release_staging()
        for hook in self._hooks:
            hook.remove()
        self._patched = False
        return self.model

    # ---- stubs and injection
    def on_stub(self, i: int, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        """What offloaded layer i's stub returns for hidden state `x` (its call's other arguments
        are `args`, `kwargs`): x itself, except at the end of a run of offloaded layers."""
        if not self._patched:
            raise RuntimeError("this OffloadController was unpatched; its stubs must not run")
        if i in self._run_start:
            self._pending, self._pending_input = [], x
        elif x is not self._pending_input:
            raise RuntimeError(
                f"offloaded layer {i}: its input is not the hidden state its run started with; "
                "the model changes hidden states between layers, which parallel residuals do not support")
        if self.alphas[i] != 0:
            self._pending.append((i, args, kwargs))
        if i not in self._run_end:
            return x
        pending, self._pending, self._pending_input = self._pending, [], None
        if not pending:  # every layer of the run removed
            return x
        if self.inject_distance == 1:
            return self._inject(x, pending)
        x32 = x.float()
        self._deferred.defer(i, sum(self.alphas[j] * (self._compute(j, x, a, kw).float() - x32) for j, a, kw in pending))
        return self._deferred.add_final(x) if i == len(self._layer_list) - 1 else x

    def on_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What the offloaded embedding's stub returns: its rows for `input_ids`, read from disk."""
        if not self._patched:
            raise RuntimeError("this OffloadController was unpatched; its stubs must not run")
        return self._embedding.forward_rows(input_ids)

    def _inject(self, x: torch.Tensor, pending: list) -> torch.Tensor:
        if len(pending) == 1 or self.config.runs == "sequential":
            for i, args, kwargs in pending:  # each from the one before: at alpha 1 the original model
                x = _blend(x, self._compute(i, x, args, kwargs), self.alphas[i])
            return x
        x32 = x.float()
        out = x32.clone()
        for i, args, kwargs in pending:
            out += self.alphas[i] * (self._compute(i, x, args, kwargs).float() - x32)
        return out.to(x.dtype)

    def _compute(self, i: int, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        layer = self._acquire(i)
        try:
            if i in self.host_layers:  # the hidden state and the call's tensors go to the layer
                host = torch.device("cpu")
                out = layer(x.to(host), *_moved(args, host), **_moved(kwargs, host))
            else:
                out = layer(x, *args, **kwargs)
        finally:
            self._residency[i].release(i)
        out = out[0] if isinstance(out, tuple) else out
        return out.to(x.device) if i in self.host_layers else out

    def _acquire(self, i: int) -> nn.Module:
        self._tensors[i].bind(self._residency[i].acquire(i))
        if not self._model_bytes:
            self._model_bytes = tensor_bytes(module_tensors(self.model), self.device)
        self.counters.note_resident(self._model_bytes + self.buffer_bytes())
        return self.layer_modules[i]


def check_host_compute(host: tuple[int, ...], computed: list[int], host_modules: dict[int, nn.Module]) -> None:
    """host_compute names computed offloaded layers; the ones a GPU would compute on the host
    (`host_modules`) are not bitsandbytes 4-bit."""
    stray = sorted(set(host) - set(computed))
    if stray:
        raise ValueError(f"host_compute names layers that are not offloaded and computed: {stray}")
    quantized = [i for i, m in host_modules.items() if any(type(p).__name__ == "Params4bit" for p in m.parameters())]
    if quantized:
        raise ValueError(f"host_compute: layers {quantized} are bitsandbytes 4-bit, whose CPU kernels want a "
                         "layout of their own; host compute takes bf16, fp16 or fp32 layers")


def _blend(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """lerp(x, y, alpha): y itself at alpha 1 (lerp(x, y, 1) is y and lerp(x, y, 0) is x, exactly;
    x + (y - x) is not)."""
    return y if alpha == 1.0 else torch.lerp(x.float(), y.float(), alpha).to(x.dtype)


def _moved(value, device: torch.device):
    """`value` with every tensor in it (in tuples, lists and dicts) moved to `device`; anything
    else (a KV cache object, which keeps each layer's tensors where that layer computes) as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def _injection_targets(num_layers: int, offloaded: list[int], distance: int) -> dict[int, int | None]:
    """For the last layer of each run of adjacent offloaded layers: the resident layer before
    which the run's contribution is added, the `distance`-th resident one after the run, or
    None when fewer than `distance` resident layers follow (added before the final norm)."""
    if distance < 1:
        raise ValueError(f"inject_distance must be >= 1, got {distance}")
    chosen = set(offloaded)
    targets = {}
    for i in offloaded:
        if i + 1 in chosen:
            continue
        after = [j for j in range(i + 1, num_layers) if j not in chosen]
        targets[i] = after[distance - 1] if len(after) >= distance else None
    return targets


def _add(hidden: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """hidden + the deferred contributions, summed in fp32."""
    return (hidden.float() + sum(deltas)).to(hidden.dtype)


_PLACEHOLDERS: dict[tuple, torch.Tensor] = {}


def _placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty tensor that keeps a slot typed while its layer is on disk."""
    key = (dtype, str(device))
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.empty(0, dtype=dtype, device=device)
    return _PLACEHOLDERS[key]


# --------------------------------------------------------------------------- entry point

def store_layers(model: nn.Module, layers: list[int], cache_dir: str | Path, materialize,
                 device: torch.device | str, progress: bool = True) -> LayerStore:
    """Write the layer files of a model whose `layers` are not loaded (meta tensors): for each in
    turn, ``materialize(i, layer)`` makes it real on `device`, it is stored, and its tensors
    are dropped (placeholders) before the next, so no two are ever on the device together.
    `model` may hold nothing else yet (from_pretrained's model on the meta device, before its
    weights load: bench/layer_loading.py): then the most the device holds is one layer. Returns the store,
    for ``patch_model(..., store=...)`` once the model's other weights are loaded; the layer
    modules keep their structure (a bitsandbytes layer its quant states) for the binding.
    ``store.peak_bytes`` is the most weight bytes this held on the device."""
    device = torch.device(device)
    layer_list = find_decoder_layers(model)
    store = LayerStore(cache_dir, *model_fingerprint(model, device))
    peak = [tensor_bytes(module_tensors(model), device)]

    def one_at_a_time():
        for i in layers:
            materialize(i, layer_list[i])
            peak.append(tensor_bytes(module_tensors(model), device))
            tensors = {name: ref.get() for name, ref in layer_tensor_refs(layer_list[i]).items()}
            # within the layer only: the layers before it were freed (their addresses may be reused)
            _check_not_shared(i, tensors, {})
            yield i, tensors
            del tensors  # stored: its memory goes before the next one comes
            for ref in layer_tensor_refs(layer_list[i]).values():
                ref.set(_placeholder(ref.get().dtype, device))

    store.sync(one_at_a_time(), total=len(layers), progress=progress)
    store.peak_bytes = max(peak)
    return store


def patch_model(model: nn.Module, layers, cache_dir: str | Path, *, config: OffloadConfig | None = None,
                store: LayerStore | None = None, progress: bool = True, **options) -> OffloadController:
    """Offload `layers` of `model` to `cache_dir` and replace them by stubs, in place.

    layers: a list of indices or a select_layers pattern (``even``, ``every:3``, ``2-10``), or a
    Plan (plan(): every layer offloaded, its resident ones kept; options then add fields such
    as alpha or cold to its config).
    How: an OffloadConfig, or its fields as keywords (alpha, mode, prefetch, budget_bytes,
    io_bandwidth, inject_distance, cold, offload_embeddings, cpu_read: see OffloadConfig).
    Either way the views hold the stored bytes, so alpha = 1 stays exact.
    store: the layers' files, already written by store_layers (a model too large for the
    device, loaded without them); the layers hold no tensors, only their structure.
    ``controller.load_peak_bytes`` is the most weight bytes on the device while the layers
    were stored: the model's whole weights if they were loaded, else store_layers' peak or
    the model's resident part, whichever is more.
    """
    if config is not None and options:
        raise TypeError(f"patch_model takes an OffloadConfig or its fields, not both (got {sorted(options)})")
    if isinstance(layers, Plan):  # every layer offloaded, the plan's resident ones kept
        if config is not None:
            raise TypeError("patch_model takes a Plan or an OffloadConfig, not both")
        config, layers = layers.config(**options), list(range(len(layers.shape.layer_bytes)))
    config = config if config is not None else OffloadConfig(**options)
    layer_list = find_decoder_layers(model)
    if any(isinstance(layer, OffloadedLayer) for layer in layer_list):
        raise ValueError("model is already patched; call unpatch() on its controller first")
    offloaded = select_layers(len(layer_list), layers) if isinstance(layers, str) else sorted(set(layers))
    if not offloaded or offloaded[0] < 0 or offloaded[-1] >= len(layer_list):
        raise ValueError(f"layers {layers!r} are not valid indices of a {len(layer_list)}-layer model")
    config.alphas(offloaded)  # names only offloaded layers
    device = layer_device(model, layer_list[offloaded[0]])
    config.check_device(device)
    if device.type == "cpu":  # all of it, so resident_bytes() does not change at the first forward
        prepack_nf4_for_cpu(model)
    load_peak_bytes = tensor_bytes(module_tensors(model), device)
    if store is None:
        store = LayerStore(cache_dir, *model_fingerprint(model, device))
        items = {i: {name: ref.get() for name, ref in layer_tensor_refs(layer_list[i]).items()} for i in offloaded}
        _check_not_shared_with_resident(model, layer_list, items)
    else:
        _check_stored(store, layer_list, offloaded)
        load_peak_bytes, items = max(load_peak_bytes, store.peak_bytes), {}
    store.cold = config.cold
    embedding = _embedding_to_offload(model) if config.offload_embeddings else None
    if embedding is not None:
        items[EMBEDDING] = {"weight": embedding.weight.data}
    if items:
        store.sync(items, progress=progress, written_with=config.record())
    del items
    controller = OffloadController(model, offloaded, store, config)
    controller.load_peak_bytes = load_peak_bytes
    return controller


def layer_device(model: nn.Module, layer: nn.Module) -> torch.device:
    """The device offloaded layers compute on: that of `layer`'s tensors, or, when it holds none
    that are loaded (store_layers' meta structure), that of the model's first loaded one."""
    loaded = (p.device for p in (*layer.parameters(), *model.parameters()) if p.device.type != "meta")
    return next(loaded)


def _check_stored(store: LayerStore, layer_list: nn.ModuleList, offloaded: list[int]) -> None:
    """The store holds every offloaded layer, with the tensors (names, dtypes, shapes) the
    layer modules expect."""
    for i in offloaded:
        layout = store.layouts.get(i)
        if layout is None:
            raise ValueError(f"layer {i} is not in the given store ({store.dir})")
        refs = layer_tensor_refs(layer_list[i])
        if set(refs) != set(layout.entries):
            raise ValueError(f"layer {i}: the stored tensors {sorted(layout.entries)} are not the module's "
                             f"{sorted(refs)} ({store.path(i)})")


def _check_not_shared_with_resident(model: nn.Module, layer_list: nn.ModuleList, tensors: dict) -> None:
    """_check_not_shared for every offloaded layer, against every tensor outside them."""
    offloaded_modules = {id(m) for i in tensors for m in layer_list[i].modules()}
    owners: dict[tuple, str] = {}
    for mod_name, mod in model.named_modules():
        if id(mod) in offloaded_modules:
            continue
        for name, ref in _own_tensor_refs(mod, f"{mod_name}." if mod_name else "").items():
            tensor = ref.get()
            if tensor.numel():
                owners[_storage_key(tensor)] = name
    for i, named in tensors.items():
        _check_not_shared(i, named, owners)


def _check_not_shared(i: int, tensors: dict, owners: dict) -> None:
    """Refuse to offload a tensor that a resident module (or another offloaded layer) also
    holds (tied weights): it would stay in memory anyway and come back as a second copy.
    `owners` (storage -> tensor name) gains this layer's tensors."""
    for name, tensor in tensors.items():
        if not tensor.numel():
            continue
        if tensor.device.type == "meta":
            raise ValueError(f"layer {i} tensor {name} is on the meta device (not loaded); "
                             "store the layers with store_layers and pass store=")
        key = _storage_key(tensor)
        if key in owners:
            raise ValueError(f"layer {i} tensor {name} shares storage with {owners[key]}; "
                             "tied or shared tensors cannot be offloaded")
        owners[key] = f"layer {i} tensor {name}"


def _embedding_to_offload(model: nn.Module) -> nn.Module | None:
    """The input embedding; or None, with a warning, when another module holds its weight too
    (tied): a tied output head needs the whole matrix every forward, so it stays."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None:
        raise ValueError("offload_embeddings needs an input embedding (get_input_embeddings()) that is an "
                         f"nn.Embedding without max_norm; this model has {type(embedding).__name__}")
    key = _storage_key(embedding.weight)
    for mod_name, mod in model.named_modules():
        if mod is embedding:
            continue
        for name, ref in _own_tensor_refs(mod, f"{mod_name}." if mod_name else "").items():
            if ref.get().numel() and _storage_key(ref.get()) == key:
                warnings.warn(f"the input embedding shares its weight with {name} (tied): it stays resident, "
                              "since that module needs the whole matrix; offloading it saves nothing", stacklevel=3)
                return None
    return embedding


def _parent_slot(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute name) under which `module` sits in `model`."""
    for name, mod in model.named_modules():
        if mod is module and name:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr
    raise ValueError(f"{type(module).__name__} is not a submodule of the model")


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()



# --------------------------------------------------------------------------- fitting a model to a device

@dataclass(frozen=True)
class ModelBytes:
    """What a plan places: each decoder layer's bytes as the controller counts them (its file's
    data section), the parts that always stay, and the KV cache's bytes per token."""

    layer_bytes: tuple[int, ...]
    embedding_bytes: int        # the input embedding's matrix (a tied head's: here, and head_bytes 0)
    head_bytes: int
    other_bytes: int            # final norm, rotary tables, an embedding's buffers (Gemma's embed_scale)
    tied: bool                  # the head shares the embedding's matrix: the embedding cannot leave
    kv_bytes_per_token: int     # K and V of every layer, one token of one sequence

    @classmethod
    def of(cls, model: nn.Module, device: torch.device | str, store: LayerStore | None = None) -> "ModelBytes":
        """From a loaded model: each layer's file data section, from its stored layout (a layer
        stored and empty, store_layers') or as serialize_layer would lay its tensors out. On a
        CPU, NF4 weights are repacked first, as patch_model does before it stores them."""
        device = torch.device(device)
        if device.type == "cpu":
            prepack_nf4_for_cpu(model)
        layers = find_decoder_layers(model)
        per_layer = tuple(store.layouts[i].data_bytes if store is not None and i in store.layouts
                          else layer_data_bytes(layer) for i, layer in enumerate(layers))
        parts = weight_breakdown(model, device)
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and head.weight is embedding.weight
        # only the matrix leaves with offload_embeddings (Gemma's embed_scale buffer stays): the rest is "other"
        matrix = tensor_bytes([embedding.weight], device)
        return cls(per_layer, matrix, parts["head_bytes"], parts["other_bytes"] + parts["embedding_bytes"] - matrix,
                   tied, kv_bytes_per_token(model.config, _compute_dtype(model)))


def layer_data_bytes(layer: nn.Module) -> int:
    """The data section serialize_layer would write for `layer`: its tensors in order, each
    starting on an ALIGN_BYTES boundary."""
    offset = 0
    for ref in layer_tensor_refs(layer).values():
        offset += -offset % ALIGN_BYTES
        tensor = ref.get()
        offset += tensor.numel() * tensor.element_size()
    return offset


def _compute_dtype(model: nn.Module) -> torch.dtype:
    floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes a dynamic KV cache holds per token of one sequence: K and V of every layer."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Rates:
    """The measured rates a plan's times come from (bench.planning probes and caches them)."""

    layer_compute_s: float      # one decoder layer's forward in one decode step (the planned batch and context)
    fixed_compute_s: float      # the rest of a step: embedding, final norm, output head
    read_Bps: float             # a layer file into a device buffer: from the page cache, or the storage (cold)
    # the share of a read's time that is a copy on the compute device's own cores (a CPU's
    # memcpy out of the page cache: a background read slows compute by that long); 0 on a GPU,
    # whose copy engine and DMA leave the SMs alone
    read_compute_share: float = 1.0
    h2d_Bps: float | None = None  # GPU: pinned host -> device; None on a CPU
    stream_overhead_s: float = 0.0  # a streamed layer's cost in the compute thread beyond its read (binding its views)
    host_layer_compute_s: float | None = None  # a GPU: one layer computed by the host CPU from host memory (None:
    # not measured, so host compute is not weighed)
    source: str = ""            # where they were measured (recorded beside the plan)


def stream_step_s(layer_compute_s: list[float], fixed_compute_s: float, read_s: dict[int, float],
                  depth: int, read_compute_share: float = 0.0, tokens: int = 6) -> float:
    """Seconds per decode step of stream residency, by replaying LayerStreamer: the layers
    compute in forward order; a streamed layer (a key of `read_s`, its read's seconds) that is
    not read ahead is read in the compute thread (compute waits); with depth d >= 1 one reader
    thread reads the next d streamed layers (the order wraps into the next token) into
    min(d + 1, streamed) slots, each freed when its layer's compute ends. A background read
    slows the compute it overlaps by read_compute_share of the overlap (a CPU copying while it
    computes). Steady state: the mean of the last tokens of `tokens`."""
    order = sorted(read_s)
    n = len(order)
    if not n:
        return sum(layer_compute_s) + fixed_compute_s
    slots = min(depth + 1, n)
    t, reader_t, busy = 0.0, 0.0, []           # compute clock, reader free at, reader (start, end)
    jobs: dict[int, float] = {}                 # global stream index -> read done at
    free = slots
    ends = []

    def read_ahead(g: int, steps: int, now: float) -> None:
        nonlocal reader_t, free
        if not depth:
            return
        for h in range(g + 1, g + steps + 1):
            if h in jobs:
                continue
            if not free:
                break
            free -= 1
            start = max(now, reader_t)
            reader_t = start + read_s[order[h % n]]
            jobs[h] = reader_t
            busy.append((start, reader_t))

    def slowed(start: float, seconds: float) -> float:
        overlap = sum(max(0.0, min(e, start + seconds) - max(s, start)) for s, e in busy)
        return seconds + read_compute_share * overlap

    for token in range(tokens):
        for i, c in enumerate(layer_compute_s):
            if i not in read_s:
                t += slowed(t, c)
                continue
            g = token * n + order.index(i)
            if g not in jobs:                   # not read ahead: drain, then read in the caller
                t = max([t, *jobs.values()])
                free += len(jobs)
                jobs.clear()
                free -= 1
                t += read_s[i]
                jobs[g] = t
            t = max(t, jobs[g])
            read_ahead(g, depth, t)
            t += slowed(t, c)
            del jobs[g]
            free += 1
            read_ahead(g, depth + 1, t)
        t += slowed(t, fixed_compute_s)
        ends.append(t)
    last = ends[len(ends) // 2:]
    return (last[-1] - ends[len(ends) // 2 - 1]) / len(last)


@dataclass(frozen=True)
class DraftRates:
    """A draft's measured yield and cost, for plan() (bench.drafting.probe_draft measures them
    by speculative decoding in one configuration): where a plain decode step takes step_s,
    speculative decoding takes (draft_s_per_verify + step_s + verify_extra_s) /
    tokens_per_verify seconds per token. The yield is measured in one configuration; a self
    draft's depends on which layers its substitutes stand in for (measured at the no-draft plan's)."""

    kind: str                      # lookup, self:<kind>, or a draft model (--draft's spelling)
    tokens_per_verify: float       # new tokens per target forward: accepted draft tokens + the target's own
    draft_s_per_verify: float      # drafting's seconds per target forward (the draft catching up included)
    verify_extra_s: float = 0.0    # a verify forward's seconds beyond a plain step's: the drafted tokens' compute
    resident_bytes: int = 0        # device bytes the draft holds whatever streams: a draft model's weights
    substitute_share: float = 0.0  # a self draft: its substitutes' bytes per byte of the streamed layers
    kv_bytes_per_token: int = 0    # the draft's own KV cache, one token (a model or self draft keeps one)
    source: str = ""

    @property
    def self_draft(self) -> bool:
        return self.substitute_share > 0

    def device_bytes(self, shape: ModelBytes, streamed: tuple[int, ...], context_tokens: int) -> int:
        """Its weights (a self draft: a substitute per streamed layer) and its KV cache."""
        substitutes = int(self.substitute_share * sum(shape.layer_bytes[i] for i in streamed))
        return self.resident_bytes + substitutes + self.kv_bytes_per_token * context_tokens

    def token_s(self, step_s: float) -> float:
        """Seconds per token of speculative decoding where a plain step takes step_s."""
        return (self.draft_s_per_verify + step_s + self.verify_extra_s) / self.tokens_per_verify


def drafted(c: "Candidate", draft: DraftRates, shape: ModelBytes, context_tokens: int) -> "Candidate":
    """Candidate c decoding speculatively with `draft`: the draft's bytes added, its step time
    the time per token."""
    return dataclasses.replace(c, draft=draft.kind, draft_bytes=draft.device_bytes(shape, c.streamed, context_tokens),
                               step_s=draft.token_s(c.step_s))


PLACEMENTS = ("interleaved", "first-fit", "last")
# predicted step times this close count as equal (the probe's rates move by more between runs)
PLAN_TOLERANCE = 0.02


def placement_streamed(n_layers: int, n_streamed: int, placement: str) -> tuple[int, ...]:
    """Which n_streamed of n_layers stream: ``first-fit`` keeps the first ones (fit_budget's rule),
    so the last stream; ``last`` keeps the last ones; ``interleaved`` spreads them evenly, each
    streamed layer after resident ones that compute while it is read."""
    if placement == "first-fit":
        return tuple(range(n_layers - n_streamed, n_layers))
    if placement == "last":
        return tuple(range(n_streamed))
    if placement == "interleaved":
        return tuple(sorted({int((k + 0.5) * n_layers / n_streamed) for k in range(n_streamed)})) if n_streamed else ()
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")


@dataclass(frozen=True)
class Candidate:
    """One configuration a plan weighed: its bytes on the device and its predicted step time."""

    placement: str
    streamed: tuple[int, ...]
    prefetch: int
    cpu_read: str | None
    offload_embeddings: bool
    weights_bytes: int          # peak weights on the device: resident parts, kept layers, stream slots
    kv_bytes: int               # the KV cache reserved on the device for the planned context and batch
    step_s: float               # predicted seconds per decode step
    host_compute: bool = False  # the streamed layers are computed by the host instead (approximate)
    draft: str = ""             # decodes speculatively with this draft (DraftRates.kind); step_s is then per token
    draft_bytes: int = 0        # the draft's weights and KV cache on the device

    @property
    def device_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.draft_bytes

    def config(self, n_layers: int, **fields) -> OffloadConfig:
        """The OffloadConfig that runs this candidate on an n_layers model: every layer offloaded,
        the others than `streamed` kept, runs in sequence (other fields, e.g. alpha or cold, as given)."""
        return OffloadConfig(mode="stream", keep=tuple(i for i in range(n_layers) if i not in self.streamed),
                             runs="sequential", prefetch=self.prefetch,
                             host_compute=self.streamed if self.host_compute else (),
                             cpu_read=self.cpu_read or "copy",  # nothing streamed, or a GPU: kept in buffers
                             offload_embeddings=self.offload_embeddings, **fields)


def candidate(shape: ModelBytes, rates: Rates, streamed: tuple[int, ...], prefetch: int, cpu_read: str | None,
              offload_embeddings: bool, kv_bytes: int, placement: str = "", host_compute: bool = False) -> Candidate:
    """A configuration's bytes (as the controller counts its peak) and predicted step time.
    A mapped CPU layer is held until standby(), counted as a buffer: so with map every streamed
    layer counts, and reads cost nothing from the page cache. host_compute (a GPU): the
    streamed layers are computed by the host instead, at rates.host_layer_compute_s each, no
    device bytes, their share of the KV cache on the host."""
    layers = shape.layer_bytes
    embedding = 0 if offload_embeddings and not shape.tied else shape.embedding_bytes
    fixed = embedding + shape.head_bytes + shape.other_bytes
    kept = sum(n for i, n in enumerate(layers) if i not in streamed)
    if host_compute:
        device_kv = kv_bytes * (len(layers) - len(streamed)) // len(layers)
        compute_s = [rates.host_layer_compute_s if i in streamed else rates.layer_compute_s
                     for i in range(len(layers))]
        return Candidate(placement, streamed, 0, cpu_read, offload_embeddings and not shape.tied, fixed + kept,
                         device_kv, stream_step_s(compute_s, rates.fixed_compute_s, {}, 0), True)
    if cpu_read == "map":
        held, read_s = sum(layers[i] for i in streamed), {}
    else:
        held = min(prefetch + 1, len(streamed)) * max((layers[i] for i in streamed), default=0)
        copy_Bps = rates.h2d_Bps
        read_s = {i: layers[i] / rates.read_Bps + (layers[i] / copy_Bps if copy_Bps else 0.0) for i in streamed}
    overhead_s = rates.stream_overhead_s if cpu_read != "map" else 0.0  # a mapped layer is bound once
    compute_s = [rates.layer_compute_s + (overhead_s if i in streamed else 0.0)
                 for i in range(len(layers))]
    step = stream_step_s(compute_s, rates.fixed_compute_s, read_s, prefetch, rates.read_compute_share)
    return Candidate(placement, streamed, prefetch, cpu_read, offload_embeddings and not shape.tied,
                     fixed + kept + held, kv_bytes, step)


@dataclass(frozen=True)
class Plan:
    """What stays, what streams and how, for a device of device_bytes: the fastest predicted
    candidate that fits, from exact levers only (which layers stream, read-ahead depth, copy or
    map, the input embedding's rows from disk). Every layer is offloaded; the resident ones are
    kept (OffloadConfig.keep) from their first use in an inference until standby(), so idle the
    device holds only the parts that always stay. patch_model(model, plan, cache_dir) applies it."""

    device_bytes: int
    shape: ModelBytes
    rates: Rates
    context_tokens: int
    batch_size: int
    chosen: Candidate
    candidates: tuple[Candidate, ...]   # every one weighed, the chosen among them

    @property
    def streamed(self) -> tuple[int, ...]:
        return self.chosen.streamed

    @property
    def resident(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.shape.layer_bytes)) if i not in self.chosen.streamed)

    @property
    def draft(self) -> str:
        """The draft it decodes speculatively with ("": none)."""
        return self.chosen.draft

    @property
    def predicted_tok_s(self) -> float:
        return self.batch_size / self.chosen.step_s

    def config(self, **fields) -> OffloadConfig:
        """The OffloadConfig that runs this plan (other fields, e.g. alpha or cold, as given)."""
        return self.chosen.config(len(self.shape.layer_bytes), **fields)

    def record(self) -> str:
        """The plan in one line, for a CSV cell."""
        c = self.chosen
        return (f"{'host' if c.host_compute else 'streamed'}={_ranges(c.streamed) or 'none'} placement={c.placement} "
                f"prefetch={c.prefetch} cpu_read={c.cpu_read or '-'} "
                f"embedding={'disk' if c.offload_embeddings else 'resident'}"
                + (f" draft={c.draft}" if c.draft else ""))

    def __str__(self) -> str:
        c, s = self.chosen, self.shape
        embedding = 0 if c.offload_embeddings else s.embedding_bytes
        kept = sum(n for i, n in enumerate(s.layer_bytes) if i not in c.streamed)
        slots = c.weights_bytes - embedding - s.head_bytes - s.other_bytes - kept
        rows = [("resident layers", _ranges(self.resident) or "none", kept),
                ("host-computed" if c.host_compute else "streamed layers",
                 f"{_ranges(c.streamed)} ({c.placement}" + (", approximate)" if c.host_compute else
                                                             f", prefetch {c.prefetch}"
                                                             f"{', ' + c.cpu_read if c.cpu_read else ''})")
                 if c.streamed else "none", slots),
                ("input embedding", "disk (rows per token)" if c.offload_embeddings else "resident", embedding),
                ("output head", "tied to the embedding" if s.tied else "resident", s.head_bytes),
                ("norms, rotary", "resident", s.other_bytes),
                (f"KV cache", f"{self.context_tokens} tokens x {self.batch_size}", c.kv_bytes)]
        if c.draft:
            rows.append(("draft", f"{c.draft}: weights and its KV cache", c.draft_bytes))
        lines = [f"plan for {self.device_bytes / 2**30:.2f} GiB ({self.device_bytes:,} bytes):"]
        lines += [f"  {part:<16} {what:<44} {nbytes / 2**20:>9.1f} MiB" for part, what, nbytes in rows]
        lines.append(f"  {'total':<16} {'':<44} {c.device_bytes / 2**20:>9.1f} MiB; predicted "
                     f"{self.predicted_tok_s:.2f} tok/s ({len(self.candidates)} candidates weighed; rates: "
                     f"{self.rates.source or 'given'})")
        return "\n".join(lines)


def _ranges(indices) -> str:
    """2 3 4 7 -> '2-4,7'."""
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def fewest_streamed(shape: ModelBytes, device_bytes: int, make) -> Candidate:
    """The candidate make(streamed) with the fewest streamed layers that fits device_bytes, or
    every layer streamed when none fits."""
    n_layers = len(shape.layer_bytes)
    for n in range(1, n_layers + 1):
        c = make(n)
        if c.device_bytes <= device_bytes or n == n_layers:
            return c


def plan(model: nn.Module | ModelBytes, device_bytes: int, *, rates: Rates, context_tokens: int = 512,
         batch_size: int = 1, device: torch.device | str = "cpu", store: LayerStore | None = None,
         prefetch_depths: tuple[int, ...] = (0, 1, 2), allow_host_compute: bool = False,
         cpu_reads: tuple[str, ...] = CPU_READS, drafts: tuple[DraftRates, ...] = ()) -> Plan:
    """Fit `model` (or its ModelBytes) to a device of `device_bytes`, the KV cache of
    `context_tokens` x `batch_size` reserved: for each read-ahead depth, copy or map, and
    placement, the fewest streamed layers that fit, timed by stream_step_s from `rates`;
    the fastest that fits wins, and among those within PLAN_TOLERANCE of it one without a draft
    (a draft's measured yield is the least certain rate), then the fewest streamed bytes, then
    device bytes, then the order of PLACEMENTS.
    Streaming nothing is a candidate too. The input embedding's rows are read from disk
    when anything streams and it is not tied (a few KB per token). Raises ValueError when
    nothing fits: the parts that always stay, the cache and one stream slot.
    allow_host_compute (a GPU, rates.host_layer_compute_s measured): also weigh computing the
    streamed layers on the host (approximate: only when the user allows it). cpu_reads: the CPU
    read paths weighed (cold or throttled reads need ("copy",): a mapped layer is read once).
    drafts (batch 1): each configuration again decoding speculatively with each draft, its
    bytes competing with the resident layers' (a self draft's substitutes need streamed layers)."""
    device = torch.device(device)
    shape = model if isinstance(model, ModelBytes) else ModelBytes.of(model, device, store)
    kv = shape.kv_bytes_per_token * context_tokens * batch_size
    n_layers = len(shape.layer_bytes)
    reads = cpu_reads if device.type == "cpu" else (None,)
    weighed = []
    for draft in (None, *(drafts if batch_size == 1 else ())):
        def with_draft(c: Candidate) -> Candidate:
            return drafted(c, draft, shape, context_tokens) if draft else c
        if not (draft and draft.self_draft):  # a self draft of nothing streamed is the target itself
            weighed.append(with_draft(candidate(shape, rates, (), 0, None, False, kv, "none")))
        for depth in prefetch_depths:
            for cpu_read in reads:
                for placement in PLACEMENTS:
                    weighed.append(fewest_streamed(shape, device_bytes, lambda n: with_draft(candidate(
                        shape, rates, placement_streamed(n_layers, n, placement), depth, cpu_read, True, kv,
                        placement))))
    if allow_host_compute and device.type != "cpu" and rates.host_layer_compute_s is not None:
        for placement in PLACEMENTS:
            weighed.append(fewest_streamed(shape, device_bytes, lambda n: candidate(
                shape, rates, placement_streamed(n_layers, n, placement), 0, None, True, kv, placement,
                host_compute=True)))
    fitting = [c for c in weighed if c.device_bytes <= device_bytes]
    if not fitting:
        least = min(weighed, key=lambda c: c.device_bytes)
        raise ValueError(f"nothing fits {device_bytes:,} bytes: streaming every layer still needs "
                         f"{least.device_bytes:,} (weights {least.weights_bytes:,}, KV cache {kv:,} for "
                         f"{context_tokens} tokens x {batch_size})")
    # within PLAN_TOLERANCE of the fastest the model cannot tell them apart: no draft, the fewest
    # streamed bytes (less to read), then the fewest device bytes (fewer slots), then PLACEMENTS' order
    fastest = min(c.step_s for c in fitting)
    near = [c for c in fitting if c.step_s <= fastest * (1 + PLAN_TOLERANCE)]
    best = min(near, key=lambda c: (bool(c.draft), sum(shape.layer_bytes[i] for i in c.streamed), c.device_bytes,
                                    PLACEMENTS.index(c.placement) if c.placement in PLACEMENTS else -1, c.step_s))
    return Plan(device_bytes, shape, rates, context_tokens, batch_size, best, tuple(weighed))
