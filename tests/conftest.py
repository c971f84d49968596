"""Fixtures shared by several test modules (pytest finds them here; no test module imports
another): ``demo_data`` (tests/demo_data.py), ``dataset`` (tests/pipeline_data.py) and ``one_thread``."""

from __future__ import annotations

import pytest
import torch

from tests.demo_data import build_small_demo
from tests.pipeline_data import HAS_FFCV, write_fixture


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """A small demo dataset built through the CLI, as a user would (once per test module)."""
    return build_small_demo(tmp_path_factory.mktemp("data") / "demo")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """``(root, arrays)``: the tiny 3-class dataset every backend reads (once per test module)."""
    root = tmp_path_factory.mktemp("tiny")
    formats = ("wds", "arrays") + (("ffcv",) if HAS_FFCV else ())
    arrays = write_fixture(root, formats)
    return root, arrays


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, restored after: small tensors on a shared 2-core machine,
    where extra threads only add contention (``pytest.mark.usefixtures("one_thread")``)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
