"""The PatchCore family: a memory bank of normal patch features, fitted without gradients.

Its knobs live in its own ``patchcore`` section (:class:`~wsi_anomaly.models.patchcore.
PatchCoreConfig`); ``model.backbone_weights`` says where the backbone comes from (``imagenet``
for Wide ResNet-50-2, ``random`` for tests, or a local weights file — the only source of a
foundation model). The fit is one pass over the normal tiles with no gradient, streaming patch
features into the coreset builder; :meth:`PatchCoreFamily.fit_end` selects the coreset; the
calibration follows. The headline image score is the maximum of the map (PatchCore's); the
map's mean is given too, as the other families with maps give both (``score_mean`` and
``score_max`` of the scorer, the ``score`` and ``max`` columns of ``tiles.csv``).

The backbone is never copied into checkpoints (a foundation model is a gigabyte, often under a
licence that forbids copying it): the checkpoint holds the memory bank and records the
backbone's identity — ``<name>-imagenet1k-v1``, ``<name>-random`` (rebuilt from a fixed seed) or
``<name>-file:<sha256>``; a model fitted on a file needs that file to score
(``--backbone-weights PATH``), and a file with another hash is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from wsi_anomaly.models.calibration import Calibration
from wsi_anomaly.models.family import (
    Epoch,
    EpochRng,
    ModelFamily,
    Prediction,
    ScoringModule,
    Step,
)
from wsi_anomaly.models.patchcore import PatchCore, PatchCoreConfig
from wsi_anomaly.models.transforms import to_unit_float
from wsi_anomaly.models.weights import Backbone, sha256_file
from wsi_anomaly.models.wide_resnet import WideResNetPatchFeatures, load_wide_resnet50

if TYPE_CHECKING:
    from wsi_anomaly.config import Config

#: The seed every randomly initialised backbone is built from, so that a checkpoint fitted on
#: random weights (tests, demos) rebuilds the same backbone when it is scored.
RANDOM_BACKBONE_SEED = 0


def _wide_resnet(weights: str, target_dim: int) -> nn.Module:
    return load_wide_resnet50(weights, target_dim=target_dim)


def _foundation(name: str, weights: str) -> nn.Module:
    from wsi_anomaly.models.foundation import build_foundation

    return build_foundation(name, weights)


def load_backbone(config: Config, weights: str) -> tuple[nn.Module, str]:
    """The frozen backbone of ``config.patchcore.backbone`` with weights from ``weights``
    (``imagenet`` | ``random`` | a file) and its identity (``<name>-file:<full sha256>`` for a
    file)."""
    p = config.patchcore
    is_file = weights not in ("imagenet", "random")
    if weights == "imagenet" and p.backbone != "wide_resnet50_2":
        raise ValueError(
            f"the {p.backbone} backbone has no torchvision ImageNet weights: pass its weights "
            "file with --backbone-weights PATH (or random for tests)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_BACKBONE_SEED)
        if p.backbone == "wide_resnet50_2":
            module = _wide_resnet(weights, p.target_dim)
        else:
            module = _foundation(p.backbone, weights)
    if is_file:
        digest = getattr(module, "weights_sha256", None) or sha256_file(Path(weights).expanduser())
        identity = f"{p.backbone}-file:{digest}"
    elif weights == "random":
        identity = f"{p.backbone}-random"
    else:
        identity = f"{p.backbone}-imagenet1k-v1"
    return module, identity


def _recorded_weights(identity: str, given: str | None, fallback: str) -> str:
    """The ``--backbone-weights`` value that rebuilds the backbone a checkpoint recorded as
    ``identity``; ``ValueError`` in one line when the file is missing or has another hash."""
    name, _, source = identity.partition("-file:")
    if not source:
        if given is not None:
            raise ValueError(
                f"--backbone-weights is for models fitted on a weights file; this one was "
                f"fitted on {identity}"
            )
        if identity.endswith("-random"):
            return "random"
        if identity.endswith("-imagenet1k-v1"):
            return "imagenet"
        raise ValueError(f"unknown backbone identity {identity!r}")
    candidates = [given] if given is not None else [fallback]
    path = Path(candidates[0]).expanduser() if candidates[0] else None
    if path is None or not path.is_file():
        raise ValueError(
            f"the model was fitted on {name} weights from a file (sha256 {source[:12]}…), "
            "which checkpoints do not copy; pass that file with --backbone-weights PATH"
        )
    digest = sha256_file(path)
    if digest != source:
        raise ValueError(
            f"--backbone-weights {path} has sha256 {digest[:12]}…, but the model was fitted on "
            f"{name} weights with sha256 {source[:12]}…; pass the file it was fitted with"
        )
    return str(path)


def _no_backbone(state: Any = None, backbone_identity: str = "") -> nn.Module:
    raise RuntimeError("the PatchCore family resolves its backbones itself")


class PatchCoreFamily(ModelFamily):
    name = "patchcore"
    title = "PatchCore"
    default_preset = "patchcore"
    fast_preset = "patchcore_fast"
    section = "patchcore"
    section_type = PatchCoreConfig
    schedule_section = "patchcore"
    loss_terms = ()
    weakly_supervised = False
    #: The map's maximum is PatchCore's image score, its mean the second.
    score_names = ("max", "mean")
    #: so slides rank, colour and class tiles by the map's maximum too
    tile_score = "max"
    has_maps = True
    stores_backbone = False
    throughput_note = "normal images per second through the backbone and into the memory bank"
    backbone = Backbone("patchcore", "PatchCore backbone", _no_backbone, dict)
    exportable = True

    def epochs(self, config: Config) -> int:
        return 1

    def describe_schedule(self, config: Config) -> str:
        p = config.patchcore
        return f"one pass, {p.backbone} features, bank of at most {p.coreset_budget} patches"

    def describe_training(self, config: Config, n_normal: int, n_anomalies: int) -> str:
        return (
            f"fitting patchcore on {n_normal} tiles ({self.describe_schedule(config)}, backbone "
            f"weights {config.model.backbone_weights})"
        )

    def map_size(self, config: Config) -> int:
        p = config.patchcore
        if p.backbone == "wide_resnet50_2":
            return WideResNetPatchFeatures.grid(p.image_px, p.image_px)[0]
        from wsi_anomaly.models.foundation import FOUNDATION_MODELS

        return int(FOUNDATION_MODELS[p.backbone].grid)

    # -- model ----------------------------------------------------------------------------------
    def _make(self, config: Config, backbone: nn.Module, identity: str) -> PatchCore:
        p = config.patchcore
        model = PatchCore(
            backbone,
            # foundation backbones resample tiles to their card's input themselves
            input_px=p.image_px if p.backbone == "wide_resnet50_2" else None,
            # the Wide ResNet module averages each patch's neighbourhood itself
            aggregate=p.backbone != "wide_resnet50_2",
            coreset_budget=p.coreset_budget,
            projection_dim=p.projection_dim,
            pool_factor=p.pool_factor,
            seed=config.seed,
            search_chunk=p.search_chunk,
        )
        model.backbone_identity = identity
        return model

    def make_model(self, config: Config, backbone: nn.Module) -> nn.Module:
        return self._make(config, backbone, str(getattr(backbone, "backbone_identity", "")))

    def build(self, config: Config) -> nn.Module:
        try:
            backbone, identity = load_backbone(config, config.model.backbone_weights)
        except ValueError as exc:
            from wsi_anomaly.errors import WeightsUnavailableError

            raise WeightsUnavailableError(str(exc)) from None
        return self._make(config, backbone, identity)

    def restore(
        self,
        config: Config,
        state_dict: Mapping[str, torch.Tensor],
        backbone_identity: str,
        backbone_weights: str | None = None,
    ) -> nn.Module:
        weights = _recorded_weights(
            backbone_identity, backbone_weights, config.model.backbone_weights
        )
        backbone, _ = load_backbone(config, weights)
        model = self._make(config, backbone, backbone_identity)
        if set(state_dict) != {"memory_bank"}:
            raise ValueError(
                f"a patchcore checkpoint holds one tensor, memory_bank; found {sorted(state_dict)}"
            )
        model.load_bank(state_dict["memory_bank"])
        return model

    def expected_state(self, config: Config, backbone_identity: str) -> dict[str, torch.Tensor]:
        # the bank's rows and width depend on the fit and the backbone: any (M, C) float matrix
        return {"memory_bank": torch.empty((0, 0), device="meta")}

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"memory_bank": cast(PatchCore, model).memory_bank}

    def transform(self, images: torch.Tensor, config: Config) -> torch.Tensor:
        return to_unit_float(images)

    def scoring_module(self, model: nn.Module, calibration: Calibration) -> nn.Module:
        # the chunked search's loop would fix the batch size in the graph: one product instead
        return ScoringModule(
            self,
            _SearchInOneProduct(cast(PatchCore, model)),
            self.calibration_to(calibration, torch.device("cpu")),
        )

    def predict(
        self, model: nn.Module, x: Tensor, calibration: Mapping[str, Any], keep_maps: bool = True
    ) -> Prediction:
        maps = model(x).float()
        return Prediction(maps.mean(dim=(1, 2)), maps.amax(dim=(1, 2)), maps if keep_maps else None)

    # -- fitting --------------------------------------------------------------------------------
    def training_data(self, normals: Dataset, anomalies: Dataset | None, config: Config) -> Dataset:
        return normals

    def calibration_data(self, normals: Dataset, config: Config) -> Dataset:
        return normals

    def loader(
        self, data: Dataset, config: Config, rng: EpochRng, workers: int, pin_memory: bool
    ) -> Iterable[Any]:
        # every normal tile once, in order: the bank does not depend on an order of draws
        return DataLoader(
            data,
            batch_size=config.patchcore.batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=pin_memory,
        )

    def train_step(self, ep: Epoch, batch: Any) -> Step:
        x = ep.runtime.layout(to_unit_float(batch).to(ep.runtime.device, non_blocking=True))
        with ep.runtime.autocast():
            patches = cast(PatchCore, ep.model).observe(x)
        return Step(None, {"images": float(len(x)), "patches": float(patches)})

    def fit_end(self, model: nn.Module, config: Config) -> None:
        cast(PatchCore, model).finish_fit()

    def epoch_record(self, ep: Epoch, sums: Mapping[str, float], steps: int) -> dict[str, float]:
        return {"epoch": ep.epoch, "patches": sums.get("patches", 0.0)}

    def describe_epoch(self, record: Mapping[str, float]) -> str:
        return f"{int(record.get('patches', 0))} patches streamed into the bank"

    def calibration_batch(self, model: nn.Module, batch: Any, runtime: Any) -> torch.Tensor:
        x = runtime.layout(to_unit_float(runtime.to_device(batch)))
        with runtime.autocast():
            maps = model(x).float()
        return torch.stack([maps.mean(dim=(1, 2)), maps.amax(dim=(1, 2))], dim=1).cpu()

    def checkpoint_extras(self, data: Dataset, normals: Dataset) -> dict[str, Any]:
        return {}


class _SearchInOneProduct(nn.Module):
    """A fitted :class:`PatchCore` whose nearest-neighbour search is one matrix product and a
    minimum over the whole bank (what an exported graph can hold for any batch size): the same
    expansion as :func:`~wsi_anomaly.models.memory_bank.nearest_distance`, and the distance to
    the row found recomputed directly. Memory: ``B × patches × bank rows`` floats."""

    def __init__(self, model: PatchCore) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """``(B, g, g)`` float32 distance of every patch to its nearest bank row."""
        f = self.model.patch_features(x)
        b, c, h, w = f.shape
        queries = f.permute(0, 2, 3, 1).reshape(-1, c).float()
        bank = self.model.memory_bank.float()
        d2 = torch.addmm((bank * bank).sum(dim=1).unsqueeze(0), queries, bank.T, alpha=-2.0)
        nearest = (d2 + (queries * queries).sum(dim=1, keepdim=True)).argmin(dim=1)
        return (queries - bank[nearest]).norm(dim=1).reshape(b, h, w)
