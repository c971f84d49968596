"""The layout: no import cycle among the project's modules, and no test module imports another
test module (shared helpers live in non-test modules under tests/ -- tests/demo_data.py,
tests/run_dirs.py, ... -- and shared fixtures in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from tests.import_graph import find_cycle, imports_under, package_graph

REPO = Path(__file__).resolve().parents[1]


def test_no_test_module_imports_another_test_module():
    found = [hit for path in sorted((REPO / "tests").glob("test_*.py"))
             for hit in imports_under(path, REPO, "tests.test_")]
    assert not found, "move what these share into a helper module or tests/conftest.py:\n" + "\n".join(found)


def test_every_form_of_importing_a_test_module_is_caught(tmp_path):
    pkg = tmp_path / "tests"
    pkg.mkdir()
    f = pkg / "test_probe.py"
    f.write_text("import os\nimport tests.test_a as a\nfrom tests.test_b import x\n"
                 "from tests import test_c, demo_data\nfrom .test_d import y\nfrom . import test_e\n"
                 "from .ports import free_port\nimport testsuite\n\ndef f():\n    from tests.test_f import z\n")
    assert imports_under(f, tmp_path, "tests.test_") == [
        f"tests/test_probe.py:{line} imports {name}"
        for line, name in ((2, "tests.test_a"), (3, "tests.test_b.x"), (4, "tests.test_c"), (5, "tests.test_d.y"),
                           (6, "tests.test_e"), (11, "tests.test_f.z"))]
    assert imports_under(f, tmp_path, "tests") == [
        f"tests/test_probe.py:{line} imports {name}"
        for line, name in ((2, "tests.test_a"), (3, "tests.test_b.x"), (4, "tests.test_c"), (4, "tests.demo_data"),
                           (5, "tests.test_d.y"), (6, "tests.test_e"), (7, "tests.ports.free_port"),
                           (11, "tests.test_f.z"))]


PACKAGES = ("bmb", "pipelines", "shards", "launch")


def test_no_import_cycle_in_the_project():
    graph = package_graph(REPO, PACKAGES)
    # The walk sees real edges (a cycle check over an empty graph would pass for nothing).
    assert "bmb.checkpointer" in graph["bmb.trainer"] and "shards.sink" in graph["shards.writer"]
    assert "pipelines.decode" in graph["pipelines.base"]
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "__init__.py").write_text("")
    (tmp_path / "p" / "a.py").write_text("from p.b import f\n")
    (tmp_path / "p" / "b.py").write_text("def f():\n    from p import a\n")
    (tmp_path / "p" / "c.py").write_text("import p.a\n")
    graph = package_graph(tmp_path, ("p",))
    assert graph["p.a"] == {"p.b"} and graph["p.b"] == {"p.a"} and graph["p.c"] == {"p.a"}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
