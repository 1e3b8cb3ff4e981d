"""check_env.py: torch and transformers against the repo's floor, read from package metadata
(nothing imported first), bitsandbytes reported, a missing GPU named; bad states are one line."""
import importlib.metadata
import re
from pathlib import Path

import pytest

import check_env

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("version, floor, ok", [
    ("2.11.0+cu130", "2.4", True),   # a local build tag
    ("2.10.0", "2.4", True),         # compared as numbers, not as text
    ("2.4.0", "2.4", True),
    ("2.4", "2.4.0", True),
    ("2.3.1", "2.4", False),
    ("5.17.0", "5.0", True),
    ("5.0.0rc1", "5.0", True),       # a pre-release counts as its release
    ("5.18.0.dev0", "5.0", True),
    ("4.57.1", "5.0", False),
    ("10.0", "9.9.9", True),
])
def test_a_version_meets_its_floor_number_by_number(version, floor, ok):
    assert check_env.meets(version, floor) is ok


def test_the_floor_is_torch_2_4_and_transformers_5_0_and_requirements_agree():
    assert check_env.FLOORS == {"torch": "2.4", "transformers": "5.0"}
    requirements = (REPO / "requirements.txt").read_text(encoding="utf-8")
    assert re.search(r"^transformers>=(\S+)$", requirements, re.M).group(1) == check_env.FLOORS["transformers"]


@pytest.mark.parametrize("installed, message", [
    ({"torch": "2.3.1", "transformers": "5.17.0"}, "torch 2.3.1 is older than this repo's floor 2.4"),
    ({"torch": "2.11.0", "transformers": "4.57.1"}, "transformers 4.57.1 is older than this repo's floor 5.0"),
    ({"transformers": "5.17.0"}, r"torch is not installed \(this repo needs torch >= 2.4\)"),
])
def test_an_old_or_missing_package_is_one_line_and_exit_2(installed, message, monkeypatch, capsys):
    def version(package):
        if package not in installed:
            raise importlib.metadata.PackageNotFoundError(package)
        return installed[package]
    monkeypatch.setattr(check_env.importlib.metadata, "version", version)
    with pytest.raises(SystemExit) as exit_:
        check_env.main([])
    assert exit_.value.code == 2
    assert re.fullmatch(rf"usage: .*\ncheck_env.py: error: {message}\n", capsys.readouterr().err, re.S)


def test_versions_at_or_above_the_floor_are_listed(monkeypatch, capsys):
    installed = {"torch": "2.11.0+cu130", "transformers": "5.17.0"}  # the lent GPU machine's
    monkeypatch.setattr(check_env.importlib.metadata, "version", installed.__getitem__)
    monkeypatch.setattr(check_env.importlib.util, "find_spec", lambda name: None)
    assert check_env.main([]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "torch 2.11.0+cu130 (floor 2.4): ok",
        "transformers 5.17.0 (floor 5.0): ok",
        "bitsandbytes: not installed, NF4 cannot run (gpu_check.sh installs it from wheels/ if a wheel is there)",
    ]


def test_no_gpu_is_named_with_device_cuda(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        check_env.main(["--device", "cuda"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        "check_env.py: error: torch sees no CUDA device (torch.cuda.is_available() is False; a CPU build of torch?)\n")


@pytest.mark.parametrize("found, line", [
    (False, "bitsandbytes: not installed, NF4 cannot run (gpu_check.sh installs it from wheels/ if a wheel is there)"),
    (True, "bitsandbytes 0.50.2: NF4 available"),
])
def test_bitsandbytes_is_reported_without_importing_it(found, line, monkeypatch):
    monkeypatch.setattr(check_env.importlib.util, "find_spec", lambda name: object() if found else None)
    monkeypatch.setattr(check_env.importlib.metadata, "version", lambda name: "0.50.2")
    assert check_env.nf4_line() == line
