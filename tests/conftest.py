"""Fixtures shared across the suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import save_tiny_checkpoint, save_tiny_server_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def default_model():
    """The embedded real default model (SmolLM2-135M-Instruct), float32 on CPU."""
    from talora.adapters.model.loading import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_server_model(tmp_path_factory):
    """A random tiny llama with a byte-level tokenizer (``helpers.save_tiny_server_model``), loaded."""
    from talora.adapters.model.loading import load_model

    return load_model(str(save_tiny_server_model(tmp_path_factory.mktemp("tiny-server-model"))))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_server_model) -> Path:
    """The server tests' bundle (four classify tasks, one generate task) on the tiny model."""
    from tests.server.support import build_bundle

    return build_bundle(tmp_path_factory.mktemp("tiny-bundle"), tiny_server_model)
