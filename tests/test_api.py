"""``wsimil_core.api`` resolves its names lazily: light names stay light, registry names see every model/method."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import wsimil_core.api as api

API_FILE = Path(api.__file__)


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_reader_and_store_import_no_torch_and_no_method():
    code = (
        "import sys\n"
        "from wsimil_core.api import FeatureStore, open_slide\n"
        "assert callable(open_slide) and FeatureStore.__name__ == 'FeatureStore'\n"
        "print(sorted(m for m in ('torch', 'wsimil_core.methods', 'wsimil_core.engine') if m in sys.modules))\n"
    )
    assert _run(code) == "[]"


def test_registry_names_list_every_model_and_method():
    """``list_models``/``list_methods`` through the lazy API equal the registries after importing every method."""
    lazy = _run(
        "import json\nfrom wsimil_core.api import list_methods, list_models\n"
        "print(json.dumps([list_models(), list_methods()]))"
    )
    full = _run(
        "import json\nimport wsimil_core.methods\nfrom wsimil_core.methods.base import list_methods\n"
        "from wsimil_core.models.base import list_models\nprint(json.dumps([list_models(), list_methods()]))"
    )
    models, methods = json.loads(lazy)
    assert [models, methods] == json.loads(full)
    papers = {"abmil", "abmilx", "asmil", "momkd", "ahdmil", "mecds"}
    assert papers <= set(models) and papers <= set(methods)


def test_every_public_name_resolves_to_its_source():
    assert len(api.__all__) == len(set(api.__all__))
    sources = api._SOURCES
    assert set(api.__all__) == set(sources) | {"__version__"}
    for name in api.__all__:
        value = getattr(api, name)
        if name != "__version__":
            assert value is getattr(importlib.import_module(sources[name]), name), name
    assert set(api.__all__) <= set(dir(api))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        api.not_a_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from wsimil_core.api import _private_thing", {})


def test_star_import_gives_all():
    namespace: dict = {}
    exec("from wsimil_core.api import *", namespace)
    assert set(api.__all__) <= set(namespace)


def test_type_checking_block_imports_the_same_names_from_the_same_modules():
    """The ``if TYPE_CHECKING`` imports (what mypy and IDEs see) match the run-time table."""
    tree = ast.parse(API_FILE.read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {a.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert seen == api._SOURCES
