"""The fixtures every recipe test module uses, defined once; a module takes them with
``from recipe_harness.fixtures import env, one_thread  # noqa: F401`` (pytest finds fixtures in module globals)."""

from __future__ import annotations

import pytest

from recipe_harness.common import one_torch_thread, shared_env


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one thread while the module runs (see ``one_torch_thread``)."""
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, tiny_datasets_dir, prepared_data, tiny_records) -> dict:
    return shared_env(tmp_path_factory, tiny_model_dir, tiny_datasets_dir, prepared_data, tiny_records)
