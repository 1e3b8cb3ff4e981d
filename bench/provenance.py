"""Where and with what a row was measured: the machine, the device, the library versions, the
commit; the environment columns every row type ends with (``Environment``, documented inline),
filled by ``environment()``."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import platform
import subprocess
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import REPO_DIR


@dataclass(frozen=True)
class Environment:
    """The environment columns, in order (bench.schema.csv_row appends them to every row type);
    a field's comment is its column's documentation (bench.schema.column_docs)."""
    torch: str  # torch version
    transformers: str  # transformers version
    bitsandbytes: str  # bitsandbytes version (empty if not installed)
    python: str  # Python version
    torch_threads: int  # torch.get_num_threads()
    machine: str  # host name and CPU model
    cpu_isa: str  # widest CPU vector extension that matters here: avx512_bf16 (bitsandbytes' fused NF4 kernel),
        # avx512f, avx2 or other; NF4 results differ between them
    commit: str  # git rev-parse --short HEAD, '-dirty' if tracked .py files have uncommitted changes
    timestamp: str  # UTC time the row was written (ISO 8601)


# The environment columns every row type ends with, and their types (values: environment()).
ENVIRONMENT_FIELDS = {f.name: typing.get_type_hints(Environment)[f.name] for f in dataclasses.fields(Environment)}


def package_version(package: str) -> str:
    """The installed version of `package`; '' when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}"


def git_commit(repo: Path = REPO_DIR) -> str:
    """Short HEAD, plus -dirty when tracked .py files differ from it; '' outside a git checkout."""
    def git(*argv):
        return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return ""
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty else "")


def cpu_isa() -> str:
    """avx512_bf16, avx512f, avx2 or other: what decides bitsandbytes' NF4 CPU path here."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    for isa in ("avx512_bf16", "avx512f", "avx2"):
        if isa in flags:
            return isa
    return "other"


def environment() -> dict:
    """The environment columns' values now, by name (Environment's fields, in order)."""
    return dataclasses.asdict(Environment(
        torch=torch.__version__,
        transformers=package_version("transformers"),
        bitsandbytes=package_version("bitsandbytes"),
        python=platform.python_version(),
        torch_threads=torch.get_num_threads(),
        machine=f"{platform.node()} ({cpu_name()})",
        cpu_isa=cpu_isa(),
        commit=git_commit(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    ))


def process_age_s() -> float:
    """Wall seconds since this process started: what the user of a script waited."""
    import psutil
    return time.time() - psutil.Process().create_time()
