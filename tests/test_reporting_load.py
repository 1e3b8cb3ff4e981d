"""reporting/load.py: the load-peak table of results/load.csv, from made-up rows."""
import bench
from reporting import load
from test_results import _row


def _load_row(tmp_path, variant, load_peak, host_peak, standby, ppl=11.5, **changes):
    values = dict(variant=variant, model="m", quant="nf4", load_peak_bytes=load_peak,
                  load_peak_host_bytes=host_peak, standby_bytes=standby,
                  baseline_standby_bytes=None if variant == "baseline" else 1_000_000_000, ppl=ppl, load_s=2.0,
                  command=f"python run_{variant}.py")
    values.update(changes)
    bench.append_row(tmp_path / "load.csv", _row(**values))


def test_each_variant_against_the_baseline_load_peak(tmp_path):
    _load_row(tmp_path, "baseline", 1_000_000_000, 1_500_000_000, 1_000_000_000)
    _load_row(tmp_path, "kvcache", 600_000_000, 1_050_000_000, 600_000_000)
    _load_row(tmp_path, "diskoffload", 700_000_000, 1_200_000_000, 600_000_000, ppl=11.6)
    _load_row(tmp_path, "kvcache", 600_000_000, None, 600_000_000, model="other",
              command="python run_kvcache.py --model other")  # no baseline, no host peak
    text = load.sections(tmp_path)["load"]
    assert "| m | nf4 | baseline | 1000.0 | 1000.0 |  |  |  | 1500.0 |  | 11.5000 |  | 2.0 |" in text
    # saved: the baseline's peak minus the variant's, against the offloaded layers' bytes (400 MB)
    assert ("| m | nf4 | kvcache | 600.0 | 600.0 | 400.0 | 400.0 | yes | 1050.0 | 450.0 | 11.5000 "
            "| = baseline | 2.0 |") in text
    assert ("| m | nf4 | diskoffload | 700.0 | 600.0 | 400.0 | 300.0 | no | 1200.0 | 300.0 | 11.6000 "
            "| differs | 2.0 |") in text
    # no baseline row: the same-run baseline_standby_bytes gives the offloaded bytes
    assert "| other | nf4 | kvcache | 600.0 | 600.0 | 400.0 |  |  |  |  | 11.5000 |  | 2.0 |" in text


def test_the_offloaded_bytes_come_from_the_baseline_row(tmp_path):
    """The same-run baseline also counts the layer files' alignment padding (inside unpatched());
    the offloaded layers' bytes as loaded are the baseline row's standby less the variant's."""
    _load_row(tmp_path, "baseline", 1_000_000_000, None, 1_000_000_000)
    _load_row(tmp_path, "kvcache", 600_000_000, None, 600_000_000, baseline_standby_bytes=1_000_054_000)
    text = load.sections(tmp_path)["load"]
    assert "| m | nf4 | kvcache | 600.0 | 600.0 | 400.0 | 400.0 | yes |  |  | 11.5000 | = baseline | 2.0 |" in text


def test_missing_file_names_its_command(tmp_path):
    assert load.sections(tmp_path)["load"] == "No rows in results/load.csv yet: run `python sweep.py load`."


def test_the_large_shapes_against_6_gib_and_their_bound(tmp_path):
    from test_estimate import _large_rows
    _large_rows(tmp_path, cold=True)
    text = load.large_section(tmp_path)
    row = text.splitlines()[-1]
    assert row.startswith("| dummy:qwen2.5-14b nf4 | CPU: A (avx2) | cold | 22/48 (even) | 5.00 + KV 3.0 MiB = 5.00 "
                          "| yes | 0.08 | 0.1 | 0.80x | 0.1 | 10000 | 2200 | 1.00 |")
    assert row.endswith("| 1.00x |")  # the host's load peak over the model's NF4 bytes
    assert load.large_section(tmp_path / "none") == f"No rows in results/large.csv yet: run `{load.LARGE_COMMAND}`."


def test_making_a_large_shape_whole_is_set_against_its_bytes(tmp_path):
    from test_estimate import _large_rows
    _large_rows(tmp_path, cold=False)
    bench.append_row(tmp_path / "large.csv", _row(model="dummy:qwen2.5-14b", weights="dummy", quant="nf4",
                                                  device_name="CPU: A", cpu_isa="avx2", load_peak_host_bytes=10e9,
                                                  standby_bytes=8e9, load_s=600.0, ppl=None,
                                                  command="python run_baseline.py --model dummy:qwen2.5-14b"))
    assert load.large_section(tmp_path).endswith(
        "\n- Making dummy:qwen2.5-14b nf4 whole (CPU: A (avx2), `python run_baseline.py --model dummy:qwen2.5-14b`): "
        "host load peak 10.00 GB, 1.25x its 8.00 GB of weights, in 600 s.")
