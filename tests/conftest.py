import os
import runpy
import sys
from unittest import mock

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """Tiny models written once per session by the user-facing command ``python -m precise_lightning.tiny DIR``."""
    root = tmp_path_factory.mktemp("tiny_models")
    with mock.patch.object(sys, "argv", ["precise_lightning.tiny", str(root)]):
        runpy.run_module("precise_lightning.tiny", run_name="__main__")
    return root


@pytest.fixture
def model_root(tiny_root):
    """Hub ids resolve to the tiny models for the duration of a test."""
    from precise_lightning.hub import set_model_root

    set_model_root(str(tiny_root))
    yield tiny_root
    set_model_root(None)
