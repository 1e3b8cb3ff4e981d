"""gpu_check.sh, for a bare, offline GPU machine: its steps in order (listed by its dry run, which
runs none), NF4 from a wheel in wheels/ or skipped saying so, real-weight rows only where the
cache holds them, its limits within 10 minutes, bad settings in one line; and every module of
the repo imports where gguf, hqq, datasets and bitsandbytes are missing, as they are there."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "gpu_check.sh"
OPTIONAL = ("gguf", "hqq", "datasets", "bitsandbytes")  # none is on the lent GPU machine


def _dry_run(tmp_path, bitsandbytes: str, wheel: bool, cached: bool) -> subprocess.CompletedProcess:
    """GPU_CHECK_DRY_RUN=1 with everything it looks at in tmp_path: a stand-in bitsandbytes that
    imports or raises ImportError, a wheels folder with or without a wheel, a model cache with
    or without the converted real checkpoint."""
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("" if bitsandbytes == "imports" else "raise ImportError('not here')\n")
    (tmp_path / "wheels").mkdir()
    if wheel:
        (tmp_path / "wheels" / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl").write_bytes(b"")
    if cached:
        checkpoint = tmp_path / "cache" / "hf" / "qwen2.5-coder-1.5b"
        checkpoint.mkdir(parents=True)
        (checkpoint / "CONVERSION_COMPLETE").write_text("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf\n")
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path / "out"),
           "GPU_CHECK_WHEELS": str(tmp_path / "wheels"), "OFFLOAD_SKIP_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(tmp_path / "shadow")}
    env.pop("LAYERS14", None)
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


PREFLIGHT = ["== step 1: torch and transformers against the floor, the GPU (limit 20 s)",
             "$ {py} check_env.py --device cuda"]


def _rows(first: int, quant: str) -> list[str]:
    """The CUDA test cases and the three dummy 3B rows, numbered from `first`."""
    lines = [f"== step {first}: pytest -m cuda (limit 120 s)",
             "$ {py} -m pytest -m cuda -rs --junitxml={out}/pytest-cuda.xml"]
    for k, variant in enumerate(("baseline", "kvcache", "diskoffload"), start=first + 1):
        lines += [f"== step {k}: dummy 3B, {variant} ({quant}) (limit 55 s)",
                  f"$ {{py}} run_{variant}.py --model dummy:qwen2.5-3b --quant {quant} --device cuda --ppl-max-tokens 0 "
                  f"--max-new-tokens 32 --out {{out}}/{variant}.csv"]
    return lines


def _big(step: int) -> list[str]:
    return [f"== step {step}: dummy 14B, diskoffload (nf4, layers even) (limit 100 s)",
            "$ {py} run_diskoffload.py --model dummy:qwen2.5-14b --quant nf4 --device cuda --ppl-max-tokens 0 "
            "--max-new-tokens 16 --layers even --offload-embeddings --out {out}/diskoffload.csv"]


def _plan(step: int, quant: str) -> list[str]:
    return [f"== step {step}: dummy 3B, --device-budget 1500MiB ({quant}) (limit 50 s)",
            f"$ {{py}} run_diskoffload.py --model dummy:qwen2.5-3b --quant {quant} --device cuda --ppl-max-tokens 0 "
            "--max-new-tokens 16 --device-budget 1500MiB --out {out}/diskoffload.csv"]


def _real(step: int, quants: str, quant: str) -> list[str]:
    return [f"== step {step}: real weights, exactness (qwen2.5-coder-1.5b: {quants}) (limit 60 s)",
            f"$ {{py}} check_exact.py --model qwen2.5-coder-1.5b --device cuda --quants {quants} --corpus README.md "
            "--window-tokens 256 --greedy-tokens 16 --out {out}/exactness.csv",
            f"== step {step + 1}: real weights, diskoffload (qwen2.5-coder-1.5b, {quant}) (limit 45 s)",
            f"$ {{py}} run_diskoffload.py --model qwen2.5-coder-1.5b --quant {quant} --device cuda --ppl-max-tokens 0 "
            "--max-new-tokens 16 --out {out}/diskoffload.csv"]


NF4_RUNS = "NF4: bitsandbytes imports; the NF4 cases run"
NO_BIG = "== skipped: dummy 14B, diskoffload: needs NF4 (in bf16 it would stream ~26 GB a token, past the time limit)"
NO_REAL = ("== skipped: real-weight rows: {cache}/hf/qwen2.5-coder-1.5b holds no converted checkpoint "
           "(no CONVERSION_COMPLETE)")
INSTALL = ["== step 2: install bitsandbytes from its wheel, no index (limit 30 s)",
           "$ {py} -m pip install --no-deps --no-index --upgrade --target {wheels}/site "
           "{wheels}/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"]

DRY_RUNS = {
    "nf4-cached": (dict(bitsandbytes="imports", wheel=False, cached=True),
                   [*PREFLIGHT, NF4_RUNS, *_rows(2, "nf4"), *_big(6), *_plan(7, "nf4"),
                    *_real(8, "fp32,bf16,nf4", "nf4"), "== dry run: 9 steps listed, none run"]),
    "no-nf4-nothing-cached": (dict(bitsandbytes="fails", wheel=False, cached=False),
                              [*PREFLIGHT,
                               "NF4: bitsandbytes does not import and {wheels} holds no bitsandbytes-*.whl: NF4 cases "
                               "skipped (the 3B rows run --quant bf16, the 14B row does not run)",
                               *_rows(2, "bf16"), NO_BIG, *_plan(6, "bf16"), NO_REAL,
                               "== dry run: 6 steps listed, none run"]),
    "nf4-from-the-wheel": (dict(bitsandbytes="fails", wheel=True, cached=True),
                           [*PREFLIGHT, *INSTALL, NF4_RUNS, *_rows(3, "nf4"), *_big(7), *_plan(8, "nf4"),
                            *_real(9, "fp32,bf16,nf4", "nf4"), "== dry run: 10 steps listed, none run"]),
}


@pytest.mark.parametrize("setup, expected", DRY_RUNS.values(), ids=DRY_RUNS.keys())
def test_the_dry_run_lists_the_steps_in_order(setup, expected, tmp_path):
    done = _dry_run(tmp_path, **setup)
    assert (done.returncode, done.stderr) == (0, "")
    places = dict(py=sys.executable, out=tmp_path / "out", wheels=tmp_path / "wheels", cache=tmp_path / "cache")
    assert done.stdout.splitlines() == [line.format(**places) for line in expected]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_every_step_together_stays_within_ten_minutes(tmp_path):
    done = _dry_run(tmp_path, bitsandbytes="fails", wheel=True, cached=True)  # the most steps
    limits = [int(line.rsplit("(limit ", 1)[1].split()[0]) for line in done.stdout.splitlines()
              if line.startswith("== step ")]
    assert len(limits) == 10 and sum(limits) == 590 <= 600


@pytest.mark.parametrize("args, env, message", [
    (["--model", "x"], {}, "takes no arguments; its settings are environment variables (see the head of the script)"),
    ([], {"GPU_CHECK_DRY_RUN": "yes"}, "GPU_CHECK_DRY_RUN must be 0 or 1, got 'yes'"),
])
def test_bad_settings_are_one_line_and_exit_2(args, env, message, tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"gpu_check.sh: error: {message}\n")


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).stderr == ""


# --------------------------------------------------------------------------- imports without the optional packages

def _modules() -> list[str]:
    """Every module of the repo: the scripts and the core at the top, bench/, reporting/, tests/."""
    top = sorted(p.stem for p in REPO.glob("*.py"))
    packages = [f"{d}.{p.stem}" if p.stem != "__init__" else d
                for d in ("bench", "reporting") for p in sorted((REPO / d).glob("*.py"))]
    return top + packages + sorted(p.stem for p in (REPO / "tests").glob("*.py"))


IMPORT_ALL = """
import importlib, sys
for name in {optional!r}:
    sys.modules[name] = None  # importing it now raises ImportError, as where it is not installed
for name in {optional!r}:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{{name}} still imports")
failed = []
for module in {modules!r}:
    try:
        importlib.import_module(module)
    except BaseException as err:  # pytest's Skipped too: a module that skips itself at import
        failed.append(f"{{module}}: {{type(err).__name__}}: {{err}}")
print("\\n".join(failed), end="")
"""


def test_every_module_imports_without_gguf_hqq_datasets_or_bitsandbytes():
    modules = _modules()
    assert {"offload_skip", "speculative", "check_env", "run_diskoffload", "bench.layer_loading",
            "reporting.pages", "conftest", "test_cuda"} <= set(modules)
    code = IMPORT_ALL.format(optional=OPTIONAL, modules=modules)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert (done.returncode, done.stdout) == (0, ""), done.stderr[-2000:]
