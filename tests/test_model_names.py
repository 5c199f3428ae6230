"""Shared model constructor names (issue 12 item 9): in_dim, n_classes/tasks, dim, n_heads, dropout; every model
config field documented (``wsimil config`` comments it); old names load with a FutureWarning from YAML configs
and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import yaml

import wsimil_core.methods  # noqa: F401  (registers every built-in model and method)
from _helpers import train_from_config
from wsimil_core.engine.checkpoint import load_checkpoint, save_checkpoint
from wsimil_core.engine.config import load_config
from wsimil_core.errors import CheckpointError, ConfigError
from wsimil_core.methods.base import list_methods, method_class
from wsimil_core.models.base import config_field_docs, create_model, list_models, model_config_class

pytestmark = pytest.mark.usefixtures("torch_one_thread_module")

# Written out here (not read from the code) so a dropped or changed rename fails the test.
RENAMES = {
    "abmil": {"hidden": "dim"},
    "abmilx": {"inner_dim": "dim", "heads": "n_heads", "attn_hidden": "attn_dim"},
    "abmilx_e2e": {"inner_dim": "dim", "heads": "n_heads", "attn_hidden": "attn_dim"},
    "ahdmil": {"hidden": "dim"},
    "asmil": {},
    "mecds": {"heads": "n_heads", "router_hidden": "router_dim"},
    "momkd": {"embed_dim": "dim", "gat_heads": "n_heads"},
}
# Old values that differ from the defaults and are valid for the model.
OLD_VALUES = {"hidden": 32, "inner_dim": 64, "heads": 4, "attn_hidden": 8, "router_hidden": 8, "embed_dim": 32}
OLD_VALUES["gat_heads"] = 2  # embed_dim 32 divides by it
BUILTIN_MODELS = [n for n in list_models() if not n.startswith("_")]
BUILTIN_METHODS = [n for n in list_methods() if method_class(n).__module__.startswith("wsimil_core.")]
SHARED = {"in_dim", "n_classes", "tasks", "dim", "n_heads", "dropout"}


def test_every_builtin_model_has_a_rename_table_entry():
    assert sorted(BUILTIN_MODELS) == sorted(RENAMES)
    for name, renames in RENAMES.items():
        assert model_config_class(name).renamed == renames


@pytest.mark.parametrize("name", sorted(RENAMES))
def test_shared_names_and_no_old_names(name):
    fields = [f.name for f in dataclasses.fields(model_config_class(name))]
    assert fields[:2] == ["in_dim", "n_classes"]
    assert "dropout" in fields
    old = {"hidden", "heads", "inner_dim", "embed_dim", "gat_heads", "attn_hidden", "router_hidden"}
    assert not old & set(fields), f"{name} still has an old name"
    for new in RENAMES[name].values():
        assert new in fields


@pytest.mark.parametrize("name", sorted(RENAMES))
def test_every_model_config_field_is_documented(name):
    cls = model_config_class(name)
    docs = config_field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name, "").strip(), f"{name}.{f.name} has no description in its Attributes: docstring"
        assert "\n" not in docs[f.name]


def test_attribute_docs_join_continuation_lines_and_subclass_entries_win():
    @dataclasses.dataclass
    class Base:
        """Base.

        Attributes:
            a: first line
                continued: here.
            b: the base's b.
        """

        a: int = 1
        b: int = 2

    @dataclasses.dataclass
    class Child(Base):
        """Child.

        Attributes:
            b: the child's b.
            c: (c) with a colon: inside.

        Notes: not an attribute.
        """

        c: int = 3

    assert config_field_docs(Child) == {
        "a": "first line continued: here.",
        "b": "the child's b.",
        "c": "(c) with a colon: inside.",
    }


@pytest.mark.parametrize("method", BUILTIN_METHODS)
def test_wsimil_config_comments_every_model_key(method, capsys):
    from wsimil_core.cli import main

    main(["config", "--method", method])
    text = capsys.readouterr().out
    lines = text.splitlines()
    start = lines.index("model:")
    docs = config_field_docs(model_config_class(method_class(method).model_name))
    keys = list(yaml.safe_load(text)["model"])
    assert keys, method
    for key in keys:
        at = next(i for i in range(start, len(lines)) if lines[i].startswith(f"  {key}: "))
        comment = []
        i = at - 1
        while lines[i].startswith("  # "):
            comment.insert(0, lines[i][4:])
            i -= 1
        assert comment and all(c.strip() for c in comment), f"{method}: model key {key!r} has no comment"
        assert " ".join(comment) == docs[key].replace("``", "`")


@pytest.mark.parametrize("name", ["abmil", "abmilx", "ahdmil", "mecds", "momkd"])
def test_old_names_warn_and_build_the_same_config(name):
    old_cfg = {old: OLD_VALUES[old] for old in RENAMES[name]}
    new_cfg = {RENAMES[name][old]: v for old, v in old_cfg.items()}
    with pytest.warns(FutureWarning) as record:
        old_model = create_model(name, in_dim=16, **old_cfg)
    messages = " ".join(str(w.message) for w in record)
    for old, new in RENAMES[name].items():
        assert f"'{old}'" in messages and f"'{new}'" in messages and f"model '{name}'" in messages
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new_model = create_model(name, in_dim=16, **new_cfg)
    assert old_model.config == new_model.config
    for new, value in new_cfg.items():
        assert getattr(new_model.config, new) == value


@pytest.mark.parametrize("name", ["abmil", "mecds", "momkd"])
def test_old_and_new_name_together_is_a_config_error(name):
    old, new = next(iter(RENAMES[name].items()))
    with pytest.raises(ConfigError, match=f"both '{old}'.*'{new}'"):
        create_model(name, in_dim=16, **{old: OLD_VALUES[old], new: OLD_VALUES[old]})


def _yaml(tmp_path, model: dict, method: str = "abmil"):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"method": method, "model": model}))
    return path


def test_yaml_with_old_names_validates_with_a_warning_naming_the_file(tmp_path):
    path = _yaml(tmp_path, {"hidden": 16, "attn_dim": 8})
    with pytest.warns(FutureWarning, match=r"old\.yaml: model 'abmil': option 'hidden' is now called 'dim'"):
        cfg = load_config(path)
    assert cfg.model == {"dim": 16, "attn_dim": 8}
    path = _yaml(tmp_path, {"heads": 2, "router_hidden": 8, "dim": 16}, method="mecds")
    with pytest.warns(FutureWarning) as record:
        assert load_config(path).model == {"n_heads": 2, "router_dim": 8, "dim": 16}
    assert sorted(str(w.message).split("option ")[1].split(" ")[0] for w in record) == ["'heads'", "'router_hidden'"]
    with pytest.raises(ConfigError, match=r"old\.yaml: model 'abmil': both 'hidden'"):
        load_config(_yaml(tmp_path, {"hidden": 16, "dim": 16}))
    with warnings.catch_warnings():  # an unknown method's model section is left to the method check
        warnings.simplefilter("error", FutureWarning)
        assert load_config(_yaml(tmp_path, {"hidden": 16}, method="nope")).model == {"hidden": 16}


def test_yaml_with_old_names_trains_with_a_warning(synthetic_store, tmp_path):
    run = tmp_path / "run"
    config = {
        "method": "abmil",
        "model": {"hidden": 8, "attn_dim": 4, "dropout": 0.0},
        "data": {"store": str(synthetic_store.store), "labels": str(synthetic_store.labels)},
        "train": {"epochs": 1, "device": "cpu"},
        "output": {"dir": str(run), "progress": False},
    }
    with pytest.warns(FutureWarning, match="'hidden' is now called 'dim'"):
        train_from_config(config, tmp_path / "old.yaml")
    model, meta = load_checkpoint(run / "last.safetensors")
    assert meta.model_kwargs["dim"] == 8 and "hidden" not in meta.model_kwargs
    assert model.config.dim == 8


def _rewrite_model_config(path, model_config: dict) -> None:
    """Replace the checkpoint's stored model_config (what an older wsimil wrote), keeping the weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header["model_config"] = json.dumps(model_config)
    save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize(
    "name, cfg",
    [
        ("abmil", {"dim": 16, "attn_dim": 8}),
        ("mecds", {"dim": 16, "n_heads": 2, "router_dim": 8, "dropout": 0.0}),
        ("momkd", {"dim": 16, "n_heads": 2, "memory_dim": 8, "n_components": 4, "dropout": 0.0}),
    ],
)
def test_checkpoint_with_old_names_loads_with_a_warning_and_predicts_identically(tmp_path, name, cfg):
    torch.manual_seed(0)
    model = create_model(name, in_dim=12, **cfg).eval()
    path = tmp_path / "old.safetensors"
    meta = save_checkpoint(path, model, {})
    inverse = {new: old for old, new in RENAMES[name].items()}
    old_config = {inverse.get(k, k): v for k, v in meta.model_kwargs.items()}
    assert old_config != meta.model_kwargs
    _rewrite_model_config(path, old_config)
    with pytest.warns(FutureWarning, match=rf"checkpoint .*old\.safetensors: model '{name}'"):
        loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta.model_kwargs == meta.model_kwargs
    x = torch.randn(20, 12)
    coords = torch.randperm(400)[:40].reshape(20, 2) * 16
    with torch.no_grad():
        a, b = model(x, coords=coords), loaded(x, coords=coords)
    la = a.logits if isinstance(a.logits, dict) else {"y": a.logits}
    lb = b.logits if isinstance(b.logits, dict) else {"y": b.logits}
    for task in la:
        torch.testing.assert_close(la[task], lb[task], rtol=0, atol=0)
    old, new = next(iter(RENAMES[name].items()))
    _rewrite_model_config(path, {**old_config, new: old_config[old]})
    with pytest.raises(CheckpointError, match="both"):
        load_checkpoint(path)


def test_a_rename_must_point_from_an_old_name_to_a_field():
    from wsimil_core.models.base import ModelConfig, register_model

    @dataclasses.dataclass
    class BadConfig(ModelConfig):
        renamed = {"width": "nope"}  # a class attribute (not a field), as ModelConfig.renamed

    with pytest.raises(ValueError, match="'width' -> 'nope'"):
        register_model("_bad_rename", BadConfig)(torch.nn.Identity)
