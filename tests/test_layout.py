"""No test module imports another test module: shared helpers live in non-test modules under
tests/ (tests/demo_data.py, tests/run_dirs.py, ...) and shared fixtures in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

from tests.import_graph import imports_under

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
