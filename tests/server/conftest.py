"""Fixtures of the server tests. The fast tier serves ``tiny_bundle`` on ``tiny_server_model`` (a
random tiny llama with a byte-level tokenizer, milliseconds per step); tests on the real default
model are marked ``slow``.

``server`` is one real uvicorn per module with the default settings; a module that needs other
settings defines its own ``server``, and ``client`` follows it.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.server.support import GENERATE, build_bundle, serve


@pytest.fixture(scope="module")
def engine(tiny_bundle, tiny_server_model):
    """An in-process engine (no HTTP) on ``tiny_bundle``: 3 slots, 1 thread."""
    yield from _engine(tiny_bundle, tiny_server_model)


@pytest.fixture(scope="module")
def deep_bundle(tmp_path_factory, tiny_server_model):
    """``tiny_bundle``'s tasks with a deep task prompt (one B_t[l] per layer)."""
    return build_bundle(tmp_path_factory.mktemp("deep-bundle"), tiny_server_model, deep_prompt=True)


@pytest.fixture(scope="module")
def deep_engine(deep_bundle, tiny_server_model):
    """An in-process engine on ``deep_bundle``."""
    yield from _engine(deep_bundle, tiny_server_model)


@pytest.fixture(scope="module")
def rows_bundle(tmp_path_factory, tiny_server_model):
    """``tiny_bundle``'s tasks, three of them with basis rows of their own (k = 2 and k = 1)."""
    return build_bundle(tmp_path_factory.mktemp("rows-bundle"), tiny_server_model,
                        basis_rows={"spam": 2, "intent": 1, GENERATE: 1})


@pytest.fixture(scope="module")
def rows_engine(rows_bundle, tiny_server_model):
    """An in-process engine on ``rows_bundle``."""
    yield from _engine(rows_bundle, tiny_server_model)


def _engine(bundle, loaded):
    import torch

    from talora.server.engine import Engine
    from talora.server.settings import Settings

    threads = torch.get_num_threads()
    eng = Engine(Settings(bundle=bundle, num_slots=3, torch_threads=1).engine_config(), loaded=loaded)
    eng.start()
    yield eng
    eng.stop(10)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tiny_bundle, tiny_server_model):
    with serve(tiny_bundle, tiny_server_model) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module", params=["tiny", pytest.param("real", marks=pytest.mark.slow)])
def tier_model(request):
    """Each tier's model, for the modules whose tests hold on any model: the tiny random model
    (fast, in the default suite), then the real default model (``-m slow``)."""
    return request.getfixturevalue("tiny_server_model" if request.param == "tiny" else "default_model")


@pytest.fixture(scope="module")
def tier_bundle(tmp_path_factory, tier_model) -> Path:
    """The four classify tasks and the generate task of ``build_bundle`` on ``tier_model``."""
    return build_bundle(tmp_path_factory.mktemp("tier-bundle"), tier_model)
