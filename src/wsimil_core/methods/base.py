"""Method contract: a training recipe (one per paper) around one inference model.

The engine (``wsimil_core.engine``) drives every method the same way::

    method = create_method("asmil", model={"in_dim": 384, "n_classes": 2}, options={...})
    method.load_checkpoints(read_checkpoint)               # weights a recipe starts from (teacher, extension)
    for phase in method.phases:
        method.setup_phase(phase, train_dataset)           # K-means init, freezing a teacher, ...
        params = method.trainable_parameters(phase)        # optimiser over these
        for bag in loader:                                  # BagBatch, batch size 1
            step = method.training_step(bag, phase)         # {"loss": Tensor, other scalars logged}
            step["loss"].backward(); optimiser.step()
            method.after_optimizer_step(phase)              # EMA updates (anchor, teacher)
        logs = method.epoch_end(phase, epoch)               # extra per-epoch figures (alpha, JSD, ...)
        for bag in val_loader:                              # BagBatch with slide id, slide path, coords
            out = method.eval_forward(bag)                  # MILOutput of the deployed pipeline
        for name, model in method.evaluation_models().items():  # side-by-side figures, val_<name>/...
            out = method.eval_forward(bag, model)
    # The test split runs method.eval_forward(bag, best_checkpoint_model).
    # Inference of a checkpoint calls Method.predictor(model, meta)(SlideInput) (wsimil_core.methods.predictor).

``eval_forward`` is what validation and test run on one bag: by default the inference model on the bag's
features; a method whose deployed pipeline reads pixels (ABMILX E2E, AHDMIL pre-screening) reads them from
``bag.slide_path`` at ``bag.coords`` here, without side channels. Only ``method.inference_model()`` is needed at
inference; checkpoints hold its weights and config. Resume files hold ``method.state_dict()`` (all models:
anchor, teacher, memory...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import ConfigError
from wsimil_core.functional.survival import cox_risk, hazard_nll, incidence_nll
from wsimil_core.methods.predictor import FeaturePredictor, Predictor
from wsimil_core.models.base import MILOutput, create_model

CheckpointReader = Callable[[str | Path], tuple[nn.Module, Any]]
"""``read(path) -> (model, meta)``: the engine's checkpoint reader, handed to :meth:`Method.load_checkpoints`."""


class MethodOptions(BaseModel):
    """Base of every method's options schema (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


OptionsT = TypeVar("OptionsT", bound=MethodOptions)


class Method(nn.Module):
    """Base training recipe: plain cross-entropy on the model's logits (used by ``abmil``).

    Subclasses set ``name``, ``model_name``, ``options_cls`` and override what they change.
    """

    name: ClassVar[str] = ""
    model_name: ClassVar[str] = ""
    options_cls: ClassVar[type[MethodOptions]] = MethodOptions
    #: Phases the engine runs, in order (a class default; a method may set its own per instance from its options).
    phases: tuple[str, ...] = ("train",)
    #: The method's typer sub-app as ``"module:attribute"`` (e.g. ``"wsimil_core.methods.mecds.cli:app"``),
    #: mounted by the CLI as ``wsimil <name> ...``; None when the method has no commands of its own. A string,
    #: so importing a method never imports its CLI (which sits at the CLI layer).
    cli: ClassVar[str | None] = None
    #: Whether the recipe computes its supervised loss with :func:`task_loss`, so survival tasks train correctly
    #: (the engine refuses survival data for a method that does not).
    supports_survival: ClassVar[bool] = True

    def __init__(self, model: dict[str, Any], options: dict[str, Any] | MethodOptions | None = None):
        super().__init__()
        self.options = parse_options(self.options_cls, options, self.name)
        self.model = create_model(self.model_name, **model)

    # --- phases -------------------------------------------------------------------------------
    def load_checkpoints(self, read: CheckpointReader) -> None:
        """Load the weights the recipe starts from (e.g. a teacher, the checkpoint a task is added to).

        Called once by the engine after construction and before the first phase, with its checkpoint reader
        ``read(path) -> (model, meta)`` (a method never reads checkpoint files itself). Default: nothing.
        """

    def setup_phase(self, phase: str, train_data: Any) -> None:
        """Called before each phase with the training dataset (an iterable of ``BagBatch``)."""

    def trainable_parameters(self, phase: str) -> Iterable[nn.Parameter]:
        """Parameters the optimiser updates in ``phase``."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def report_thresholds(self) -> tuple[float, ...]:
        """Fixed thresholds at which validation and test also report each binary task's sensitivity and
        specificity (``sensitivity@<t>``, ``specificity@<t>``) beside those at the run's threshold; none here."""
        return ()

    def on_best_epoch(self, phase: str, epoch: int) -> None:
        """Called after validation when ``epoch`` (of ``phase``) is the best of that phase so far by the tracked
        validation metric (every epoch when there is no validation split); e.g. to keep that epoch's weights."""

    def balanced_sampling(self, phase: str) -> bool | list[str]:
        """Whether the engine should sample bags class-balanced in ``phase``: True balances every target, a
        list of target names balances those only, False samples uniformly."""
        return False

    # --- steps --------------------------------------------------------------------------------
    def training_step(self, batch: BagBatch, phase: str) -> dict[str, Tensor]:
        """Loss for one bag. Returns ``{"loss": scalar, ...}``; other scalars are logged."""
        out = self.model(batch.features, coords=batch.coords)
        loss = task_loss(out.logits, batch)
        return {"loss": loss, "ce": loss.detach()}

    def after_optimizer_step(self, phase: str) -> None:
        """Hook after each optimiser step (EMA updates)."""

    def epoch_end(self, phase: str, epoch: int) -> dict[str, float]:
        """Extra per-epoch figures to log (reset any accumulators here)."""
        return {}

    def eval_forward(self, batch: BagBatch, model: nn.Module | None = None) -> MILOutput:
        """What validation and test run on one bag (the engine calls it in eval mode, without gradients).

        Args:
            batch: one bag: ``features [N, D]``, ``coords [N, 2]``, ``slide_id``, ``slide_path`` (None when the
                store has no slide file), ``slide_attrs`` (the store's patch grid).
            model: the model to evaluate: an entry of :meth:`evaluation_models` or a model loaded from the best
                checkpoint (test split); None = :meth:`inference_model`.

        Returns:
            ``MILOutput``; the engine reads ``logits`` ``[1, C]`` (or ``{task: [1, C]}``).

        Default: the model on the bag's features, ``model(batch.features, coords=batch.coords)``. Override it
        so that validation measures the pipeline a checkpoint deploys (pixels read from ``batch.slide_path``
        at ``batch.coords``).
        """
        model = model if model is not None else self.inference_model()
        return model(batch.features, coords=batch.coords)

    def inference_model(self) -> nn.Module:
        """The module saved in checkpoints and used for prediction."""
        return self.model

    def evaluation_models(self) -> dict[str, nn.Module]:
        """Models validated side by side each epoch (e.g. ``{"online": ..., "ema": ...}``).

        The engine validates ``inference_model()`` for early stopping and checkpoints; every other entry here is
        validated too (through :meth:`eval_forward` with that model) and logged as ``val_<name>/<metric>``.
        """
        return {"online": self.inference_model()}

    def phase_lr(self, phase: str, lr: float) -> float:
        """Peak learning rate of ``phase`` given the run's ``train.lr`` (``train.phase_lr`` overrides it).
        Default: ``lr`` for every phase."""
        return lr

    def stops_early(self, phase: str) -> bool:
        """Whether ``train.early_stopping.patience`` may stop ``phase``. False for a phase whose training cannot
        move the validation metric the run tracks (it would stop after ``patience`` epochs whatever it learns);
        such a phase runs its epochs, and its best epoch is still tracked. Default: True."""
        return True

    def test_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """Models tested beside the best checkpoint's ``model`` at the end of a run (same thresholds), logged in
        the test metrics as ``test_<name>/<metric>`` (e.g. AHDMIL's DMIN on every patch). Default: none."""
        return {}

    # --- inference ----------------------------------------------------------------------------
    @classmethod
    def predictor(cls, model: nn.Module, meta: CheckpointMeta, **options: Any) -> Predictor:
        """How a checkpoint of this method predicts one slide (the inference pipeline calls it).

        ``model`` is the checkpoint's inference model (loaded, in eval mode), ``meta`` its metadata; ``options``
        are method-specific (e.g. AHDMIL's ``prescreen``). Default: the model on every patch feature.
        """
        if options:
            raise ConfigError(f"method {cls.name or meta.method!r} takes no predictor options, got {sorted(options)}")
        return FeaturePredictor(model, meta)


COX_RISKS = "cox_risk"
"""``BagBatch.extras`` key where :func:`task_loss` leaves a Cox task's risk ``{task: [1]}`` for the engine."""


def task_loss(logits: Tensor, batch: BagBatch, task: str | None = None) -> Tensor:
    """The supervised loss of one task of one bag, by the task's type (the generic head/loss plumbing).

    Args:
        logits: ``[1, C]`` the task's logits.
        batch: the bag (its ``targets``, ``survival`` and ``survival_loss``).
        task: the task (default: the first target).

    Returns:
        Classification: the cross-entropy. Survival ``nll``: the hazard NLL over the time bins
        (``functional.survival.hazard_nll``); ``incidence``: the softmax-over-bins NLL (``incidence_nll``). Survival ``cox``: zero attached to the graph; the risk
        ``l_1 - l_0`` is left in ``batch.extras["cox_risk"][task]`` and the engine adds the Cox partial
        likelihood of the bags of one step (``train.bags_per_step``; a risk set needs several slides).
    """
    name = task if task is not None else next(iter(batch.targets), "")
    if name not in batch.targets:
        raise KeyError(f"bag {batch.slide_id!r} has no target {name!r}")
    logits = logits.float().reshape(-1, logits.shape[-1])
    kind = batch.survival_loss.get(name)
    if kind is None:
        return nn.functional.cross_entropy(logits, batch.targets[name].view(-1))
    if kind == "cox":
        risk = cox_risk(logits)
        batch.extras.setdefault(COX_RISKS, {})[name] = risk
        return risk.sum() * 0.0
    time_event = batch.survival[name].reshape(-1, 2)
    loss_fn = incidence_nll if kind == "incidence" else hazard_nll
    return loss_fn(logits, batch.targets[name].view(-1), time_event[:, 1])


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wrapper holds (the engine wraps a method's trainable children in
    multi-GPU runs), else ``module`` itself. Forwards go through the wrapper; type checks and structure use this."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator registering a method under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _METHODS[cls.name] = cls
    return cls


def parse_options(options_cls: type[OptionsT], options: Any, what: str) -> OptionsT:
    """Validate method options; unknown keys and wrong types are one clear ``ConfigError``."""
    if isinstance(options, options_cls):
        return options
    try:
        return options_cls(**(options or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"method {what!r} option {key!r}: {first['msg']}") from None


def create_method(name: str, **cfg: Any) -> Method:
    """Create a registered method: ``create_method("asmil", model={...}, options={...})``."""
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _METHODS[name](**cfg)


def list_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def predictor_for(model: nn.Module, meta: CheckpointMeta, **options: Any) -> Predictor:
    """The predictor of a checkpoint: ``Method.predictor`` of its method (``meta.method``) from the registry; a
    method that is not registered (e.g. a model saved by hand) gets the default feature predictor."""
    cls = _METHODS.get(meta.method, Method)
    return cls.predictor(model, meta, **options)


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _METHODS[name]


__all__ = [
    "Method",
    "MethodOptions",
    "register_method",
    "create_method",
    "list_methods",
    "method_class",
    "predictor_for",
    "parse_options",
    "unwrap_model",
    "CheckpointReader",
    "COX_RISKS",
    "task_loss",
]
