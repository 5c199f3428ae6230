"""Training config (issue 3 item 8): schema, clear errors, overrides, default YAML, `wsimil config`/`models`."""

from __future__ import annotations

import pytest
import yaml

from wsimil_core.engine.config import (
    TrainConfig,
    apply_overrides,
    default_config_yaml,
    fill_model_options,
    load_config,
)
from wsimil_core.errors import ConfigError


def write(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_and_method_string(tmp_path):
    cfg = load_config(write(tmp_path, {"method": "asmil", "train": {"epochs": 3}}))
    assert cfg.method.name == "asmil" and cfg.method.options == {}
    assert cfg.train.epochs == 3 and cfg.train.optimizer == "adamw" and cfg.train.device == "auto"
    assert cfg.output.keep == ["best", "last"] and cfg.data.split.kind == "random"
    assert TrainConfig().data.targets == ["label"]


@pytest.mark.parametrize(
    "data, key",
    [
        ({"train": {"epochz": 3}}, "train.epochz"),
        ({"train": {"early_stopping": {"patience": "soon"}}}, "train.early_stopping.patience"),
        ({"data": {"split": {"kind": "bootstrap"}}}, "data.split.kind"),
        ({"output": {"keep": ["best", "first"]}}, "output.keep.1"),
        ({"train": {"device": "tpu"}}, "train.device"),
        ({"trian": {}}, "trian"),
        ({"train": {"lr": -1}}, "train.lr"),
    ],
)
def test_errors_name_file_and_dotted_key(tmp_path, data, key):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert path in str(exc.value) and key in str(exc.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="fold"):
        load_config(data={"data": {"split": {"kind": "kfold", "folds": 3, "fold": 3}}})


def test_overrides(tmp_path):
    path = write(tmp_path, {"method": "abmil", "train": {"epochs": 3}})
    cfg = load_config(
        path,
        [
            "train.epochs=7",
            "train.early_stopping.patience=2",
            "data.targets=[a, b]",
            "method.options.x=1",
            "output.dir=/tmp/x",
            "train.grad_clip=null",
        ],
    )
    assert cfg.train.epochs == 7 and cfg.train.early_stopping.patience == 2
    assert cfg.data.targets == ["a", "b"] and cfg.method.options == {"x": 1}
    assert str(cfg.output.dir) == "/tmp/x" and cfg.train.grad_clip is None
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(path, ["train.nope=1"])


def test_fill_model_options():
    import wsimil_core.methods  # noqa: F401  (registers every model)

    assert fill_model_options("abmil", {"dim": 8}, 32, {"label": 3}) == {"dim": 8, "in_dim": 32, "n_classes": 3}
    with pytest.raises(ConfigError, match="in_dim"):
        fill_model_options("abmil", {"in_dim": 64}, 32, {"label": 2})
    with pytest.raises(ConfigError, match="n_classes"):
        fill_model_options("abmil", {"n_classes": 4}, 32, {"label": 2})
    with pytest.raises(ConfigError, match="single-task"):
        fill_model_options("abmil", {}, 32, {"label": 2, "task_b": 2})


def test_default_yaml_for_every_method_is_valid_and_commented():
    import wsimil_core.methods  # noqa: F401
    from wsimil_core.methods.base import list_methods, method_class

    for name in list_methods():
        text = default_config_yaml(name)
        data = yaml.safe_load(text)
        cfg = load_config(data=data)
        assert cfg.method.name == name
        defaults = method_class(name).options_cls().model_dump()
        assert cfg.method.options == defaults
        assert "# peak learning rate" in text and "# run directory" in text
        for _field_name, field in method_class(name).options_cls.model_fields.items():
            if field.description:
                assert f"# {field.description}" in text
    with pytest.raises(ConfigError, match="unknown method"):
        default_config_yaml("nope")


def test_cli_config_and_models(tmp_path, capsys):
    from wsimil_core.cli import main

    main(["config", "--method", "abmil"])
    out = capsys.readouterr().out
    assert load_config(data=yaml.safe_load(out)).method.name == "abmil"
    main(["config", "--method", "abmil", "--output", str(tmp_path / "c.yaml")])
    assert load_config(tmp_path / "c.yaml").model == yaml.safe_load(out)["model"]
    main(["models"])
    out = capsys.readouterr().out
    assert "models:" in out and "methods:" in out
    lines = [x for x in out.splitlines() if x.strip().startswith("abmil ")]
    assert len(lines) == 2 and all(len(x.split()) > 2 for x in lines)
    with pytest.raises(SystemExit) as exc:
        main(["config", "--method", "nope"])
    assert exc.value.code == 1


def test_multitask_model_gets_tasks_named_after_a_single_target():
    """A multi-task model trained on one target column names its task after that column (not "label")."""
    from wsimil_core.engine.config import fill_model_options

    filled = fill_model_options("mecds", {}, in_dim=8, n_classes={"task_b": 2})
    assert filled["tasks"] == {"task_b": 2} and filled["in_dim"] == 8
    assert fill_model_options("abmil", {}, in_dim=8, n_classes={"task_b": 3})["n_classes"] == 3


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "a list"), ("42\n", "a number"), ("just words\n", "a string")])
def test_top_level_not_a_mapping_is_one_clear_error(tmp_path, capsys, text, kind):
    """Issue 17 item 8: a YAML whose top level is a list or a scalar gives one ConfigError naming the file."""
    from wsimil_core.cli import main

    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert (
        path in str(exc.value) and f"top level is {kind};" in str(exc.value) and "must be a mapping" in str(exc.value)
    )
    with pytest.raises(SystemExit) as stop:
        main(["train", path])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {exc.value}"]
