"""DESIGN.md's model contract, checked for every registered model: defaults from (in_dim, n_classes | tasks),
one bag [N, D] in, MILOutput out with [B, C] logits and maps aligned with the input patch order."""

from __future__ import annotations

import pytest
import torch

from wsimil_core.api import MILOutput, create_model, list_models

# Private names ("_tiny") are test doubles registered by other test modules; abmilx_e2e takes pixels.
FEATURE_MODELS = [name for name in list_models() if not name.startswith("_") and name != "abmilx_e2e"]


def _build(name: str, in_dim: int = 24):
    if name == "mecds":
        return create_model(name, in_dim=in_dim, tasks={"a": 2, "b": 3})
    return create_model(name, in_dim=in_dim, n_classes=2)


def _bag(n: int = 30, d: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    # Distinct, irregular positions: no ties in neighbour distances (graph models), so order cannot matter.
    coords = torch.randperm(10_000, generator=g)[: 2 * n].reshape(n, 2) * 7
    return x, coords.long()


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_every_model_follows_the_output_contract(name):
    torch.manual_seed(0)
    model = _build(name).eval()
    x, coords = _bag()
    with torch.no_grad():
        out = model(x, coords=coords)
    assert isinstance(out, MILOutput)
    logits = out.logits if isinstance(out.logits, dict) else {"label": out.logits}
    for task, t in logits.items():
        assert t.dim() == 2 and t.shape[0] == 1, (task, t.shape)
        assert torch.isfinite(t).all()
    if name == "mecds":
        assert {k: v.shape[1] for k, v in logits.items()} == {"a": 2, "b": 3}
    else:
        assert logits["label"].shape == (1, 2)
    assert "attention" in out.maps or any(k.startswith("attention/") for k in out.maps)
    for map_name, value in out.maps.items():
        assert value.shape[0] == x.shape[0], f"{name}: map {map_name!r} is not aligned with the bag"


def test_create_model_as_checks_the_class():
    from wsimil_core.methods.abmil.model import ABMIL
    from wsimil_core.models.base import create_model_as

    assert isinstance(create_model_as(ABMIL, "abmil", in_dim=8, n_classes=2), ABMIL)
    with pytest.raises(TypeError, match="model 'asmil' is a ASMIL, not a ABMIL"):
        create_model_as(ABMIL, "asmil", in_dim=8, n_classes=2)


def test_single_logits_refuses_a_multi_task_output():
    t = torch.zeros(1, 2)
    assert MILOutput(logits=t).single_logits("abmil") is t
    with pytest.raises(TypeError, match=r"mecds: expected single-task logits .*\['a', 'b'\]"):
        MILOutput(logits={"b": t, "a": t}).single_logits("mecds")
    assert MILOutput(logits={"a": t}).task_logits("mecds") == {"a": t}
    with pytest.raises(TypeError, match="abmil: expected multi-task logits"):
        MILOutput(logits=t).task_logits("abmil")


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_maps_follow_the_input_patch_order(name):
    torch.manual_seed(0)
    model = _build(name).eval()
    x, coords = _bag()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(x, coords=coords).maps
        b = model(x[perm], coords=coords[perm]).maps
    key = "attention" if "attention" in a else sorted(k for k in a if k.startswith("attention/"))[0]
    torch.testing.assert_close(a[key][perm].float(), b[key].float(), rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_feature_dimension_mismatch_is_a_clear_error(name):
    from wsimil_core.errors import WsimilError

    model = _build(name).eval()
    x, coords = _bag(d=17)
    with pytest.raises((WsimilError, ValueError)) as info:
        model(x, coords=coords)
    assert "17" in str(info.value) or "dim" in str(info.value)


# --- declared maps (MapSpec): every map a model emits is declared, with the declared shape ---------------------
ALL_MODELS = [name for name in list_models() if not name.startswith("_")]
#: maps a model declares but emits only through its slide predictor (shown by their own test below)
PREDICTOR_ONLY = {"ahdmil": {"prescreen/score", "prescreen/keep"}}


def run_small(name: str, n: int = 12, seed: int = 0):
    """``(model, MILOutput, coords)``: ``name`` with a small config on one random bag of ``n`` patches whose
    coords lie on a 256-px grid (``abmilx_e2e`` gets 32-px images, the other models features)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(64, generator=g)[:n]
    coords = torch.stack([cells % 8, cells // 8], dim=1).long() * 256
    if name == "abmilx_e2e":
        model = create_model(name).eval()
        x = torch.randn(n, 3, 32, 32, generator=g)
    else:
        model = _build(name).eval()
        x = torch.randn(n, 24, generator=g)
    with torch.no_grad():
        out = model(x, coords=coords)
    return model, out, coords


def check_maps_match_specs(model, maps, n: int) -> set[str]:
    """Every emitted map is declared, and its shape is ``[n]`` (no channels) or ``[n, len(channels)]``; returns the
    declared names that were not emitted."""
    specs = {s.name: s for s in model.map_specs()}
    assert len(specs) == len(model.map_specs()), "a map is declared twice"
    assert set(maps) <= set(specs), f"undeclared maps: {sorted(set(maps) - set(specs))}"
    for name, value in maps.items():
        want = (n, len(specs[name].channels)) if specs[name].channels else (n,)
        assert tuple(value.shape) == want, (name, tuple(value.shape), want)
    return set(specs) - set(maps)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_emitted_maps_are_the_declared_maps(name):
    from wsimil_core.api import MapSpec

    model, out, coords = run_small(name)
    specs = model.map_specs()
    assert specs and all(isinstance(s, MapSpec) for s in specs)
    assert all(s.description and "\n" not in s.description for s in specs)
    missing = check_maps_match_specs(model, out.maps, coords.shape[0])
    assert missing == PREDICTOR_ONLY.get(name, set())
    for s in specs:  # the dict form (store attrs, checkpoints) round-trips
        assert MapSpec.from_dict(s.to_dict()) == s


def test_declared_maps_follow_the_config():
    """Config-aware declarations: heads / tokens / classes / memory size / tasks / modules change the names."""
    names = lambda m: {s.name for s in m.map_specs()}  # noqa: E731
    assert {f"attention/head{j}" for j in range(8)} <= names(create_model("abmilx", in_dim=24))
    assert "attention/token15" in names(create_model("asmil", in_dim=24, n_tokens=16))
    assert "attention/class2" in names(create_model("ahdmil", in_dim=24, n_classes=3))
    comp = {s.name: s for s in create_model("momkd", in_dim=24, n_components=3).map_specs()}["memory/component"]
    assert comp.categories == ("C-3", "C-2", "C-1", "C+1", "C+2", "C+3")
    assert comp.category_of(-1) == "C-1" and comp.category_of(2) == "C+2" and comp.category_of(0) is None
    model = create_model("mecds", in_dim=24, tasks={"a": 2}, n_modules=3)
    assert {"routing/a", "routing/a/module3", "routing/a/weight", "attention/a"} == names(model) - {
        "routing/a/module1",
        "routing/a/module2",
    }
    model.add_task("c", 2)  # task extension declares the new task's maps too
    assert "routing/c/module1" in names(model)
    with torch.no_grad():
        out = model(torch.randn(9, 24))
    assert set(out.maps) == names(model)


def test_map_kinds_say_what_the_values_mean():
    """Categorical maps hold valid category codes; binary maps 0/1; probability maps lie in [0, 1]."""
    for name in ALL_MODELS:
        model, out, _ = run_small(name)
        for spec in model.map_specs():
            if spec.name not in out.maps:
                continue
            v = out.maps[spec.name].float()
            v = v[torch.isfinite(v)]
            if spec.is_categorical:
                assert set(v.long().tolist()) <= set(spec.category_codes), spec.name
                assert torch.equal(v, v.round()), spec.name
            elif spec.kind == "probability":
                assert bool(((v >= 0) & (v <= 1)).all()), spec.name


def test_ahdmil_predictor_emits_the_prescreen_maps(tmp_path):
    """The maps AHDMIL declares beyond its forward pass come from its slide predictor."""
    import numpy as np

    from wsimil_core.api import CheckpointMeta, SlideInput, predictor_for
    from wsimil_core.wsi.tiling import PatchGrid
    from wsimil_core.wsi.writer import write_pyramid_tiff

    class Features:
        """Random cached features of every patch (a FeatureSource)."""

        cached, encoder_id = True, "tiny"

        def __init__(self, n):
            self.rows = np.random.default_rng(1).normal(size=(n, 24)).astype(np.float32)

        def __call__(self, index=None):
            return self.rows if index is None else self.rows[index]

    rgb = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    slide = write_pyramid_tiff(tmp_path / "s.tiff", rgb, 0.5, levels=1, tile=128, compression="none")
    torch.manual_seed(0)
    model = create_model("ahdmil", in_dim=24, n_classes=2).eval()
    meta = CheckpointMeta.parse(
        {"model_name": "ahdmil", "method": "ahdmil", "model_config": {"in_dim": 24}, "targets": ["label"]}
    )
    coords = np.array([[x, y] for y in range(0, 256, 64) for x in range(0, 256, 64)], np.int64)
    grid = PatchGrid(coords=coords, size_level0=64, stride_level0=64, patch_px=64, mpp=0.5, origin=(0, 0))
    predictor = predictor_for(model, meta, prescreen=True)
    pred = predictor(SlideInput("s", slide, grid, Features(len(coords)), meta))
    assert {"prescreen/score", "prescreen/keep"} <= set(pred.maps)
    assert check_maps_match_specs(model, pred.maps, len(coords)) == set()


def test_doc_map_tables_are_generated_from_the_specs():
    """docs/methods/*.md hold each model's table of maps as scripts/map_table.py generates it from the specs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "map_table.py"
    spec = importlib.util.spec_from_file_location("map_table", path)
    map_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(map_table)
    rows = {name: description for name, _, description in map_table.collapse(map_table.model_specs("abmilx"))}
    assert "attention/head<j>" in rows and "head <j>" in rows["attention/head<j>"]
    assert not any(name.startswith("attention/head") and name[-1].isdigit() for name in rows)
    assert "`C+1`" in map_table.table("momkd") and "| binary | `not routed`, `routed` |" in map_table.table("mecds")
    assert map_table.main(["--check"]) == 0, "run python scripts/map_table.py --write"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_flags_its_primary_maps(name):
    """Viewers show the maps flagged ``primary`` first (one per task); the others on demand."""
    from wsimil_core.api import primary_map_names

    model = create_model(name) if name == "abmilx_e2e" else _build(name)
    specs = model.map_specs()
    flagged = [s.name for s in specs if s.primary]
    assert flagged and primary_map_names(specs) == flagged
    assert all(not s.is_categorical for s in specs if s.primary)  # a heatmap, not a category map
    assert primary_map_names([s.to_dict() for s in specs]) == flagged  # the store / checkpoint dict form


def test_primary_maps_one_per_task_and_the_rule_for_unflagged_specs():
    from wsimil_core.api import MapSpec, primary_map_names

    model = create_model("mecds", in_dim=24, tasks={"a": 2, "b": 3}, n_modules=2)
    assert len(model.map_specs()) == 10
    assert primary_map_names(model.map_specs()) == ["attention/a", "attention/b"]
    model.add_task("c", 2)
    assert primary_map_names(model.map_specs())[-1] == "attention/c"
    # specs stored before the flag existed (no "primary" key): the first declared map
    old = [{k: v for k, v in s.to_dict().items() if k != "primary"} for s in model.map_specs()]
    assert primary_map_names(old) == ["routing/a"]
    assert primary_map_names([]) == []
    assert MapSpec.from_dict(old[0]).primary is False
