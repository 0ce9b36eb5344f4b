"""The ``features-knn`` family: a memory bank of normal tile vectors extracted by another tool.

A lab that has already encoded its cohort with TRIDENT or CLAM (one ``.h5`` per slide:
``features`` ``(N, D)`` and ``coords`` ``(N, 2)``) fits this family on the normal tiles'
vectors (``wsi-anomaly train --features``) and scores slides from their feature files
(``wsi-anomaly heatmap --features``): no backbone, no pixels tiled, one score per tile (the map
is 1×1). The fit is one pass with no gradient through the same coreset builder as PatchCore;
the tile score is the distance to the nearest bank row; calibration as every family.

The checkpoint's only weights are the bank. It also records, as ``tile_features``, where the
vectors came from — the encoder's name (TRIDENT's ``encoder`` attribute, when there is one),
the feature width and the tile geometry the extractor recorded — so that scoring refuses the
vectors of another encoder or width with one line (see :func:`tile_features_record`).

The training data must carry that record: a dataset (or a ``Subset``/``ConcatDataset`` of
datasets) with a ``tile_features`` attribute, a mapping with at least ``dim``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from wsi_anomaly.models.family import Epoch, EpochRng, ModelFamily, Prediction, Step
from wsi_anomaly.models.tile_bank import TileBank, TileBankConfig
from wsi_anomaly.models.weights import Backbone


def _no_backbone(state: Any = None, backbone_identity: str = "") -> nn.Module:
    raise RuntimeError("the features-knn family has no backbone")


def tile_features_record(dataset: Dataset) -> dict[str, Any] | None:
    """The ``tile_features`` record of a training dataset, looked for through ``Subset``
    (``.dataset``) and ``ConcatDataset`` (its first part); None when it has none."""
    current: Any = dataset
    for _ in range(16):  # a few wrappers deep at most
        if current is None:
            break
        record = getattr(current, "tile_features", None)
        if isinstance(record, Mapping):
            return dict(record)
        parts = getattr(current, "datasets", None)
        current = parts[0] if parts else getattr(current, "dataset", None)
    return None


class TileBankFamily(ModelFamily):
    name = "features-knn"
    title = "tile-feature k-NN"
    default_preset = "features_knn"
    #: none: the demo and the MVTec benchmark work on images, this family on tile vectors
    fast_preset = ""
    section = "features_knn"
    section_type = TileBankConfig
    schedule_section = "features_knn"
    loss_terms = ()
    weakly_supervised = False
    inputs = "tile features"
    score_names = ("max",)
    #: one score per tile: no map localises anything inside a tile
    has_maps = False
    map_px = 1
    stores_backbone = False
    throughput_note = "tile vectors per second into the memory bank"
    backbone = Backbone("none", "no backbone", _no_backbone, dict)

    def epochs(self, config: Any) -> int:
        return 1

    def describe_schedule(self, config: Any) -> str:
        return f"one pass, bank of at most {config.features_knn.coreset_budget} tile vectors"

    def describe_training(self, config: Any, n_normal: int, n_anomalies: int) -> str:
        return f"fitting features-knn on {n_normal} tile vectors ({self.describe_schedule(config)})"

    # -- model ----------------------------------------------------------------------------------
    def _make(self, config: Any) -> TileBank:
        k = config.features_knn
        model = TileBank(
            k.coreset_budget,
            projection_dim=k.projection_dim,
            pool_factor=k.pool_factor,
            seed=config.seed,
            search_chunk=k.search_chunk,
        )
        return model

    def build(self, config: Any) -> nn.Module:
        return self._make(config)

    def restore(
        self,
        config: Any,
        state_dict: Mapping[str, torch.Tensor],
        backbone_identity: str,
        backbone_weights: str | None = None,
    ) -> nn.Module:
        if backbone_weights is not None:
            raise ValueError(
                "a features-knn model has no backbone; --backbone-weights does not apply"
            )
        if set(state_dict) != {"memory_bank"}:
            raise ValueError(
                f"a features-knn checkpoint holds one tensor, memory_bank; found {sorted(state_dict)}"
            )
        model = self._make(config)
        model.load_bank(state_dict["memory_bank"])
        return model

    def expected_state(self, config: Any, backbone_identity: str) -> dict[str, torch.Tensor]:
        # the bank's rows and width depend on the fit and the encoder: any (M, D) float matrix
        return {"memory_bank": torch.empty((0, 0), device="meta")}

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"memory_bank": cast(TileBank, model).memory_bank}

    def map_size(self, config: Any) -> int:
        return 1

    def transform(self, images: torch.Tensor, config: Any) -> torch.Tensor:
        if images.ndim != 2 or not images.is_floating_point():
            from wsi_anomaly.errors import InvalidInputError

            raise InvalidInputError(
                "a features-knn model scores tile feature vectors (TRIDENT or CLAM .h5 files), "
                "not images: run `wsi-anomaly heatmap SLIDE --features DIR --model MODEL`"
            )
        return images.float()

    def predict(
        self, model: nn.Module, x: Tensor, calibration: Mapping[str, Any], keep_maps: bool = True
    ) -> Prediction:
        distance = model(x).float()
        return Prediction(distance, distance, distance.view(-1, 1, 1) if keep_maps else None)

    # -- fitting --------------------------------------------------------------------------------
    def training_data(self, normals: Dataset, anomalies: Dataset | None, config: Any) -> Dataset:
        if tile_features_record(normals) is None:
            raise ValueError(
                "a features-knn model is fitted on tile features (TRIDENT or CLAM .h5 files), "
                "not on tiles: run `wsi-anomaly train --features DIR --out MODEL`"
            )
        return normals

    def calibration_data(self, normals: Dataset, config: Any) -> Dataset:
        return normals

    def loader(
        self, data: Dataset, config: Any, rng: EpochRng, workers: int, pin_memory: bool
    ) -> Iterable[Any]:
        # every normal vector once, in file order: the bank does not depend on an order of draws
        return DataLoader(
            data,
            batch_size=config.features_knn.batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=pin_memory,
        )

    def train_step(self, ep: Epoch, batch: Any) -> Step:
        x = batch.to(ep.runtime.device, non_blocking=True)
        n = cast(TileBank, ep.model).observe(x)
        return Step(None, {"images": float(n), "tiles": float(n)})

    def fit_end(self, model: nn.Module, config: Any) -> None:
        cast(TileBank, model).finish_fit()

    def epoch_record(self, ep: Epoch, sums: Mapping[str, float], steps: int) -> dict[str, float]:
        return {"epoch": ep.epoch, "tiles": sums.get("tiles", 0.0)}

    def describe_epoch(self, record: Mapping[str, float]) -> str:
        return f"{int(record.get('tiles', 0))} tile vectors streamed into the bank"

    def calibration_batch(self, model: nn.Module, batch: Any, runtime: Any) -> torch.Tensor:
        distance = model(runtime.to_device(batch)).float()
        return torch.stack([distance, distance], dim=1).cpu()

    def checkpoint_extras(self, data: Dataset, normals: Dataset) -> dict[str, Any]:
        record = tile_features_record(normals)
        return {} if record is None else {"tile_features": record}
