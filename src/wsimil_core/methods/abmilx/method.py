"""ABMILX training recipe: two-stage (cached features) or end-to-end from slide pixels (``e2e: true``).

Loss: cross-entropy on the slide logits. Per epoch it logs the A+ scalar ``alpha`` (Eq. 4) and
``attention_mass_share``: the share of patches holding ``sparsity_mass`` of the attention, averaged over bags and
heads -- a proxy of the paper's "sparsity" (Sec. 3.3, "the proportion of activated patches", whose activation
threshold the paper does not define).

End-to-end (``e2e: true``): ``method.model`` is an ``abmilx_e2e`` model (ResNet cut after layer3 + ABMILX,
one learning rate). Each training step draws ``n_samples`` patches of the bag's slide with multi-scale random
instance sampling (MRIS, see :mod:`wsimil_core.methods.abmilx.e2e`), reads them with DataLoader workers,
applies RandomResizedCrop (scale ``crop_scale``-1) + flips, and encodes them in chunks (activation checkpointing optional). The slide
file and grid come with the bag (``BagBatch.slide_path`` and ``slide_attrs``: ``patch_size_level0``,
``grid_origin``, from the store); validation and test (:meth:`ABMILXMethod.eval_forward`) read every patch of the
bag at ``batch.coords`` from ``batch.slide_path`` (centre crop) and encode them in chunks.
An EMA copy of the whole model (decay 0.9997) is kept when ``ema: true``: :meth:`evaluation_models` returns
``{"online", "ema"}`` and ``ema_for_inference`` makes the checkpoint hold the EMA weights.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from wsimil_core.checkpoint_meta import CheckpointMeta
from wsimil_core.data.bag import BagBatch
from wsimil_core.errors import ConfigError, DataError
from wsimil_core.features.encoders import RandomWeightsWarning
from wsimil_core.functional.attention_plus import attention_mass_share
from wsimil_core.methods.abmilx.e2e import (
    CROP_SCALE,
    E2EPredictor,
    PatchReadDataset,
    SlideInfo,
    encode_slide_patches,
    fine_split,
    mris_sample,
    patch_loader,
    slide_info_from_attrs,
)
from wsimil_core.methods.abmilx.e2e_model import ABMILXE2E, build_encoder  # (registers "abmilx_e2e")
from wsimil_core.methods.abmilx.model import ABMILX  # (registers "abmilx")
from wsimil_core.methods.base import (
    Method,
    MethodOptions,
    parse_options,
    register_method,
    task_loss,
    unwrap_model,
)
from wsimil_core.methods.predictor import Predictor
from wsimil_core.models.base import MILOutput, create_model_as
from wsimil_core.store.zarr_store import FeatureStore

log = logging.getLogger(__name__)


class ABMILXOptions(MethodOptions):
    """Options of the ``abmilx`` method (ABMILX's own hyper-parameters go under ``model``)."""

    e2e: bool = Field(
        False, description="Train end-to-end from slide pixels (encoder + ABMILX) instead of cached features."
    )
    encoder: str = Field("resnet18", description="E2E encoder: resnet18 / resnet50 cut after layer3 (256 / 1024 dims).")
    encoder_weights: str | None = Field(
        None, description="Local encoder weights file (.pth/.safetensors); none = random init (loud warning)."
    )
    n_samples: int = Field(512, ge=1, description="E2E: patches sampled per slide and step by MRIS (s).")
    scales: list[float] = Field(
        default_factory=lambda: [1.0, 2.0],
        description=(
            "E2E MRIS scales as mpp factors of the store's patch grid (1 = stored patches, 2 = 2x coarser, e.g. 5x "
            "from a 10x grid as in the paper; 0.5 = 2x finer, e.g. 20x: a random sub-patch of a stored patch)."
        ),
    )
    scale_ratios: list[float] = Field(
        default_factory=lambda: [3.0, 1.0],
        description=(
            "E2E MRIS sampling ratio per scale (normalised to sum 1; paper Eq. 2). [3, 1]: 75% main, 25% secondary "
            "(the paper's multi-scale ratio 4, i.e. s/4 secondary instances)."
        ),
    )
    crop_scale: float = Field(
        CROP_SCALE, gt=0.0, le=1.0, description="E2E: smallest area share of the training RandomResizedCrop."
    )
    input_size: int = Field(
        224, ge=8, description="E2E encoder input side in px (after RandomResizedCrop / centre crop)."
    )
    read_px: int | None = Field(
        None, ge=8, description="E2E: px at which patches are read before cropping; none = the store's patch size."
    )
    encoder_chunk: int = Field(64, ge=1, description="E2E: patches per encoder forward pass (bounds memory).")
    checkpointing: bool = Field(False, description="E2E: activation checkpointing of each encoder chunk.")
    bn_mode: Literal["sync", "train", "frozen"] = Field(
        "sync",
        description=(
            "E2E encoder BatchNorm: sync (the authors' set-up: SyncBatchNorm, plain train-mode BN in one process), "
            "train, or frozen (eval mode, running statistics fixed; safer with small encoder_chunk)."
        ),
    )
    freeze_bn: bool | None = Field(
        None, description="Deprecated: true = bn_mode frozen, false = bn_mode train (none: use bn_mode)."
    )
    num_workers: int = Field(2, ge=0, description="E2E: DataLoader worker processes reading patches.")
    eval_pixels: bool = Field(
        True, description="E2E: validation reads the slide's pixels (else uses the store's cached features)."
    )
    ema: bool = Field(
        False,
        description="Keep an EMA copy of the whole model (decay ema_decay); see evaluation_models() and ema_for_inference.",
    )
    ema_decay: float = Field(0.9997, gt=0.0, lt=1.0, description="EMA decay per optimiser step.")
    ema_for_inference: bool = Field(False, description="Save the EMA model (not the online one) in checkpoints.")
    sparsity_mass: float = Field(
        0.9, gt=0.0, le=1.0, description="Attention mass of the logged attention_mass_share (sparsity proxy)."
    )
    seed: int = Field(0, description="Seed of the MRIS sampling.")

    @model_validator(mode="after")
    def _check_scales(self) -> ABMILXOptions:
        if len(self.scales) != len(self.scale_ratios) or not self.scales:
            raise ValueError(
                f"scales {self.scales} and scale_ratios {self.scale_ratios} must be non-empty and of equal length"
            )
        if any(s <= 0 for s in self.scales) or any(r < 0 for r in self.scale_ratios) or sum(self.scale_ratios) <= 0:
            raise ValueError("scales must be > 0 and scale_ratios >= 0 with a positive sum")
        for s in self.scales:
            if s < 1:
                fine_split(s)  # a finer scale must be 1/k
        if self.freeze_bn is not None:
            warnings.warn(
                "abmilx option freeze_bn is deprecated: use bn_mode: frozen (true) or bn_mode: train (false)",
                FutureWarning,
                stacklevel=2,
            )
            self.bn_mode = "frozen" if self.freeze_bn else "train"
            self.freeze_bn = None
        if self.ema_for_inference and not self.ema:
            raise ValueError("ema_for_inference needs ema: true")
        return self


def _encoder_dim(name: str) -> int:
    return int(build_encoder(name)[1].dim)


@register_method
class ABMILXMethod(Method):
    """ABMILX with cross-entropy; two-stage or end-to-end (MRIS) training, optional whole-model EMA."""

    name = "abmilx"
    cli = "wsimil_core.methods.abmilx.cli:app"
    model_name = "abmilx"
    options_cls = ABMILXOptions
    options: ABMILXOptions
    #: False for variants that cannot train end-to-end (``abmilx-anchor``): ``e2e: true`` is refused.
    e2e_supported: ClassVar[bool] = True
    #: ``abmilx`` (two-stage) or ``abmilx_e2e`` (``e2e: true``; see :meth:`e2e_model`).
    model: ABMILX | ABMILXE2E
    ema_model: ABMILX | ABMILXE2E | None

    @classmethod
    def predictor(cls, model: nn.Module, meta: CheckpointMeta, **options: Any) -> Predictor:
        """An end-to-end checkpoint predicts from the slide's pixels with its fine-tuned encoder
        (``E2EPredictor``); a two-stage one runs ABMILX on the patch features (the default)."""
        if isinstance(model, ABMILXE2E):
            if options:
                raise ConfigError(f"method 'abmilx' (e2e) takes no predictor options, got {sorted(options)}")
            return E2EPredictor(model, meta)
        return super().predictor(model, meta, **options)

    def __init__(self, model: dict[str, Any], options: dict[str, Any] | ABMILXOptions | None = None):
        nn.Module.__init__(self)
        o = parse_options(self.options_cls, options, self.name)
        self.options = o
        cfg = dict(model)
        if o.e2e and not self.e2e_supported:
            raise ConfigError(
                f"method {self.name!r} does not support e2e: true (end-to-end training from pixels); use method "
                f"'abmilx' with e2e: true, or {self.name!r} on cached features (e2e: false)"
            )
        if o.e2e:
            dim = _encoder_dim(o.encoder)
            if cfg.get("in_dim", dim) != dim:
                log.info("abmilx e2e: model.in_dim %s replaced by the %s encoder's %d", cfg["in_dim"], o.encoder, dim)
            cfg.update(
                in_dim=dim,
                encoder=o.encoder,
                input_size=o.input_size,
                read_px=o.read_px or cfg.get("read_px", 256),
                encoder_chunk=o.encoder_chunk,
                checkpointing=o.checkpointing,
                bn_mode=o.bn_mode,
            )
            e2e = create_model_as(ABMILXE2E, "abmilx_e2e", **cfg)
            self.model = e2e
            if o.encoder_weights:
                e2e.load_encoder_weights(o.encoder_weights)
            else:
                msg = (
                    f"abmilx e2e: encoder {o.encoder!r} starts from RANDOM weights (no method.options.encoder_weights); "
                    "end-to-end training from scratch needs far more data and steps. Give a local weights file."
                )
                warnings.warn(msg, RandomWeightsWarning, stacklevel=2)
                log.warning(msg)
        else:
            self.model = create_model_as(ABMILX, "abmilx", **cfg)
        self.ema_model = None
        if o.ema:
            self.ema_model = copy.deepcopy(self.model)
            for p in self.ema_model.parameters():
                p.requires_grad_(False)
        # E2E state: slide infos by id, the training store (full grids of subsampled bags), the patch reader
        # (tests inject a fake one).
        self.reader: Callable[[str], Any] | None = None
        self._store: FeatureStore | None = None
        self._infos: dict[str, SlideInfo] = {}
        self._steps = 0
        self._sparsity: list[float] = []

    # --- phases -------------------------------------------------------------------------------------------
    def setup_phase(self, phase: str, train_data: Any) -> None:
        """E2E: keep the training store (full patch grids) and take ``read_px`` from its patch size."""
        if not self.options.e2e:
            return
        store = getattr(train_data, "store", None)
        if store is None:
            return
        self._store = store
        ids = list(getattr(train_data, "slide_ids", []) or [])
        if self.options.read_px is None and ids:
            px = store.slide_attrs(ids[0]).get("patch_size")
            if px:
                for m in self._models():
                    self.e2e_model(m).config.read_px = int(px)

    def _models(self) -> list[ABMILX | ABMILXE2E]:
        return [m for m in (self.model, self.ema_model) if m is not None]

    def e2e_model(self, model: nn.Module | None = None) -> ABMILXE2E:
        """``model`` (default: ``self.model``; unwrapped from DDP) as the ``abmilx_e2e`` model an ``e2e: true``
        run trains."""
        model = unwrap_model(self.model if model is None else model)
        if not isinstance(model, ABMILXE2E):
            raise ConfigError(
                f"method 'abmilx': end-to-end steps need an abmilx_e2e model (options e2e: true), got "
                f"{type(model).__name__}"
            )
        return model

    def _info(self, batch: BagBatch) -> SlideInfo:
        """Where the bag's pixels are: ``batch.slide_path`` and the grid in ``batch.slide_attrs``.

        MRIS samples the slide's full grid: the bag's coords, or the store's when the bag was subsampled.
        """
        sid = batch.slide_id
        if sid in self._infos:
            return self._infos[sid]
        if not batch.slide_path:
            raise DataError(
                f"abmilx e2e: no slide file known for bag {sid!r} (its store has no slide_path); end-to-end "
                "training reads pixels, so use a store written by `wsimil extract` from the slide files"
            )
        if "patch_index" in batch.extras and self._store is not None:
            coords = self._store.read_coords(sid)
        elif batch.coords is not None:
            coords = batch.coords.detach().cpu().numpy()
        else:
            raise DataError(f"abmilx e2e: bag {sid!r} has no patch coords, so MRIS cannot sample its slide")
        info = slide_info_from_attrs({**batch.slide_attrs, "slide_path": batch.slide_path}, sid, coords)
        self._infos[sid] = info
        return info

    # --- steps --------------------------------------------------------------------------------------------
    def forward_e2e(self, batch: BagBatch) -> MILOutput:
        """MRIS-sample the bag's slide, read + augment the patches, encode in chunks, run ABMILX."""
        o, model = self.options, self.e2e_model()
        info = self._info(batch)
        if info.coords is None:  # _info always sets them
            raise DataError(f"abmilx e2e: no patch grid for bag {batch.slide_id!r}")
        rng = np.random.default_rng([o.seed, self._steps])
        sc, sizes, _ = mris_sample(
            info.coords, info.size_level0, info.origin, o.n_samples, o.scales, o.scale_ratios, rng
        )
        ds = PatchReadDataset(
            info.slide_path, sc, sizes, model.config.read_px, model.config.input_size, True, self.reader, o.crop_scale
        )
        feats = model.encode(patch_loader(ds, model.config.encoder_chunk, o.num_workers))
        return model.mil(feats)

    def eval_forward(self, batch: BagBatch, model: nn.Module | None = None) -> MILOutput:
        """Validation/test of one bag. E2E with ``eval_pixels``: every patch at ``batch.coords`` is read from
        ``batch.slide_path`` (test transform: centre crop), encoded by the model's encoder in chunks, then ABMILX;
        otherwise the model on the store's cached features."""
        model = model if model is not None else self.inference_model()
        if not (self.options.e2e and self.options.eval_pixels):
            return model(batch.features, coords=batch.coords)
        if not batch.slide_path or batch.coords is None:
            raise DataError(
                f"abmilx e2e: bag {batch.slide_id!r} has no slide file (its store has no slide_path), so validation "
                "cannot read its pixels; use a store written from the slide files, or set "
                "method.options.eval_pixels: false to validate on the store's cached features"
            )
        slide = slide_info_from_attrs(
            {**batch.slide_attrs, "slide_path": batch.slide_path}, batch.slide_id, batch.coords.cpu().numpy()
        )
        e2e = self.e2e_model(model)
        feats = encode_slide_patches(e2e, slide, batch.coords, self.options.num_workers, self.reader)
        return e2e.mil(feats, coords=batch.coords)

    def training_step(self, batch: BagBatch, phase: str) -> dict[str, Tensor]:
        """Cross-entropy of one bag (E2E: of the MRIS sample of its slide). Returns loss, ce, alpha."""
        if self.options.e2e:
            out = self.forward_e2e(batch)
        else:
            out = self.model(batch.features, coords=batch.coords)
        self._steps += 1
        loss = task_loss(out.single_logits("abmilx"), batch)
        alpha = out.extras["alpha"].detach().float()
        w = out.extras["attention_weights"].detach()
        self._sparsity.append(float(attention_mass_share(w, self.options.sparsity_mass).mean()))
        return {"loss": loss, "ce": loss.detach(), "alpha": alpha}

    @torch.no_grad()
    def after_optimizer_step(self, phase: str) -> None:
        """EMA of the whole model: ``theta_ema = d * theta_ema + (1 - d) * theta`` (buffers copied)."""
        if self.ema_model is None:
            return
        d = self.options.ema_decay
        for pe, p in zip(self.ema_model.parameters(), self.model.parameters()):
            pe.lerp_(p.detach().to(pe.dtype), 1.0 - d)
        for be, b in zip(self.ema_model.buffers(), self.model.buffers()):
            be.copy_(b)

    def epoch_end(self, phase: str, epoch: int) -> dict[str, float]:
        """``alpha`` (A+ scalar at the epoch's end) and mean ``attention_mass_share`` over the epoch's bags."""
        out: dict[str, float] = {}
        model = unwrap_model(self.model)
        abmilx = model.mil if isinstance(model, ABMILXE2E) else model
        if isinstance(abmilx, ABMILX) and abmilx.config.attn_plus:
            out["alpha"] = float(abmilx.alpha.detach())
        if self._sparsity:
            out["attention_mass_share"] = float(np.mean(self._sparsity))
        self._sparsity = []
        return out

    def evaluation_models(self) -> dict[str, nn.Module]:
        """Models to evaluate side by side: the online model and, with ``ema: true``, its EMA copy."""
        models: dict[str, nn.Module] = {"online": self.model}
        if self.ema_model is not None:
            models["ema"] = self.ema_model
        return models

    def inference_model(self) -> nn.Module:
        """The online model, or its EMA copy with ``ema_for_inference`` (which the options check needs ``ema``)."""
        if self.options.ema_for_inference and self.ema_model is not None:
            return self.ema_model
        return self.model

    def trainable_parameters(self, phase: str) -> Iterable[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


__all__ = ["ABMILXMethod", "ABMILXOptions"]
