"""reporting/tables.py: cells, tables, marker blocks and GitHub anchors."""
from reporting import tables


def test_cells_are_blank_when_empty_never_zero():
    assert tables.num("", ".2f") == "" and tables.num(None, ".2f") == ""
    assert tables.num("0.5", ".2f", "x") == "0.50x" and tables.num(2.0, ".1f") == "2.0"
    assert tables.mb("1500000") == "1.5" and tables.mb("") == ""
    assert tables.percent("50", "200") == "25.0%" and tables.percent("50", "") == ""


def test_markdown_table_escapes_pipes():
    text = tables.markdown_table(["a", "b"], [["x|y", 1]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_machine_kind_names_the_cpu_extension():
    assert tables.machine_kind({"device": "cpu", "device_name": "CPU: X", "cpu_isa": "avx2"}) == "CPU: X (avx2)"
    assert tables.machine_kind({"device": "cuda", "device_name": "RTX", "cpu_isa": "avx2"}) == "RTX"
    assert tables.machine_kind({"device_name": "CPU: X", "cpu_isa": ""}) == "CPU: X (unrecorded ISA)"


def test_replace_block_keeps_everything_outside_the_markers():
    text = "a\n<!-- x:start -->\nold\n<!-- x:end -->\nb\n"
    assert tables.replace_block(text, "x", "new") == "a\n<!-- x:start -->\nnew\n<!-- x:end -->\nb\n"
    assert tables.replace_block(text, "y", "new") is None


def test_anchors_as_github_makes_them():
    assert tables.anchor("Qwen2.5-Coder-1.5B beside the original") == "qwen25-coder-15b-beside-the-original"
    assert tables.anchor("How far can alpha move from 1?") == "how-far-can-alpha-move-from-1"
    assert tables.anchor("Injecting later: inject_distance") == "injecting-later-inject_distance"
    assert tables.headings("# A\n```\n# not a heading\n```\n### B: c\n") == ["A", "B: c"]
