"""No private member is reached from another class or module: every ``obj._name`` in the
package has ``self``, ``cls`` or ``super()`` as its object, or reaches a third-party internal
that has no public spelling, each listed below with its reason. Module-level private names
(``_helper(...)``) are a module's own and not attribute access, so they are not counted."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = ["offload_skip.py", "speculative.py", *sorted(f"bench/{p.name}" for p in (REPO / "bench").glob("*.py")),
           *sorted(f"reporting/{p.name}" for p in (REPO / "reporting").glob("*.py"))]

# torch's own module internals, which patching a module reaches by necessity
TORCH_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}

# (file, the expression as ast.unparse writes it): why it cannot be public
THIRD_PARTY = {
    ("offload_skip.py", "torch._C"): "torch: the pinned host allocator's cache has no public emptying call",
    ("offload_skip.py", "torch._C._host_emptyCache"): "torch: as above",
    ("offload_skip.py", "model.config._name_or_path"): "transformers: the config's source, its only spelling",
    ("speculative.py", "F._convert_weight_packed_for_cpu_inverse"):
        "bitsandbytes: undoes its CPU repacking of NF4 weights; no public inverse",
    ("bench/layer_loading.py", "model._keys_to_ignore_on_load_unexpected"):
        "transformers: how from_pretrained is told which checkpoint tensors are skipped on purpose",
    ("bench/layer_loading.py", "base._load_pretrained_model"):
        "transformers: the loading step a streamed class overrides, called through its base",
    ("bench/layer_loading.py", "base._finalize_model_loading"): "transformers: as above",
}
# Params4bit(...)._quantize(device): bitsandbytes quantises a weight on a device only this way
THIRD_PARTY_CALLS = {("speculative.py", "Params4bit", "_quantize")}


def private_reaches(path: str) -> list[str]:
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"), filename=path)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        if node.attr in TORCH_MODULE_INTERNALS or (path, ast.unparse(node)) in THIRD_PARTY:
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and \
                (path, owner.func.id, node.attr) in THIRD_PARTY_CALLS:
            continue
        found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", PACKAGE)
def test_no_private_member_is_reached_from_outside(path):
    assert private_reaches(path) == []


def test_every_listed_exception_is_still_needed():
    """An entry whose expression is gone from its file is stale: the list only shrinks."""
    for path, expression in THIRD_PARTY:
        text = ast.unparse(ast.parse((REPO / path).read_text(encoding="utf-8")))
        assert expression in text, f"{path}: {expression} is listed as needed but no longer used"


def test_the_check_sees_a_reach_into_another_object(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "m.py").write_text("class A:\n    def f(self, other):\n        self._x = other._y\n"
                                   "        super()._z()\n        return self.g._w\n")
    assert private_reaches("m.py") == ["m.py:3: other._y", "m.py:5: self.g._w"]
