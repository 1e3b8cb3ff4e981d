"""run_peers.py: the peers' device maps and arguments, and one tiny run beside accelerate's disk offload."""
import pytest
from conftest import tiny_model
from tiny_checkpoint import save_tiny_checkpoint

import bench
import run_peers


def test_device_map_sends_the_offloaded_layers_to_disk():
    model = tiny_model("llama")
    device_map = run_peers.accelerate_device_map(model, [2, 4], "disk", "cpu")
    assert device_map == {"lm_head": "cpu", "model.embed_tokens": "cpu", "model.norm": "cpu",
                          "model.rotary_emb": "cpu",
                          **{f"model.layers.{i}": "disk" if i in (2, 4) else "cpu" for i in range(8)}}


@pytest.mark.parametrize("argv, message", [
    (["--peers", "flexgen"], "--peers: unknown flexgen; choose from accelerate-disk, accelerate-cpu, airllm"),
    (["--quant", "nf4", "--peers", "accelerate-disk"], "accelerate cannot offload bitsandbytes 4-bit modules"),
    (["--no-kv-cache"], "--no-kv-cache: the peers are compared with the KV cache on"),
    (["--model", "org/none", "--peers", "none"], "model 'org/none' is not in the local Hugging Face cache"),
])
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_peers.main([*argv, "--out", str(tmp_path / "peers.csv"), "--cache-dir", str(tmp_path / "cache")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("run_peers.py: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "peers.csv").exists()


def test_a_tiny_run_beside_accelerate_disk_offload(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "peers.csv"
    argv = ["--model", str(checkpoint), "--quant", "fp32", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--max-new-tokens", "4", "--warmup", "0", "--repeats", "1", "--batch-size", "3", "--prefetch", "0",
            "--peers", "accelerate-disk,accelerate-cpu", "--out", str(out)]
    assert run_peers.main(argv) == 0
    rows = {r["system"]: r for r in bench.read_rows(out)}
    assert list(rows) == ["resident", "stream", "accelerate-disk", "accelerate-cpu"]
    assert rows["accelerate-disk"]["note"].startswith("greedy tokens equal to the resident model's")
    assert rows["accelerate-cpu"]["decode_tok_s"] == "" and "not applicable" in rows["accelerate-cpu"]["note"]
    assert all(r["batch_size"] == "3" and r["layers_offloaded"] == "2 4" for r in rows.values())
    # idle weights: the offloaded layers are on disk for both; the resident model holds them all
    assert int(rows["stream"]["idle_bytes"]) == int(rows["accelerate-disk"]["idle_bytes"])
    assert int(rows["stream"]["idle_bytes"]) < int(rows["resident"]["idle_bytes"])
    assert int(rows["accelerate-disk"]["peak_bytes"]) > int(rows["accelerate-disk"]["idle_bytes"])
    assert rows["stream"]["command"].startswith("python run_peers.py --model ")


def test_airllm_missing_names_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "airllm", None)  # import airllm raises ImportError
    with pytest.raises(bench.UsageError, match=r"--peers airllm needs AirLLM; run: pip install airllm"):
        run_peers.load_airllm(tmp_path, "bf16", "cpu", tmp_path)
