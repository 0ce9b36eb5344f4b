"""Pathology foundation models as frozen patch-feature backbones, built through ``timm``.

Interface:

- :class:`FoundationSpec`: one model's facts, as its model card states them: ``name`` (registry
  key), ``label``, ``architecture`` (the ``timm`` model name) and ``timm_kwargs``, ``input_px``
  (the square input it was trained on), ``patch_px``, ``mean``/``std`` (normalisation of RGB in
  ``[0, 1]``), ``n_prefix_tokens`` (class token + register tokens, which lead the token
  sequence), ``embed_dim`` (token width ``D``), ``embedding`` (``"cls"``: the tile embedding is
  the class token; ``"cls+mean"``: the class token concatenated with the mean of the patch
  tokens), ``weights_layout`` (``"timm"`` or ``"transformers-dinov2"``), ``card`` (source URL).
  ``grid`` = ``input_px // patch_px``; ``embedding_dim`` = ``D`` or ``2 D``.
- :data:`FOUNDATION_MODELS`: ``{"uni", "virchow2", "h-optimus-0", "phikon-v2"}`` → spec.
- :func:`build_foundation` ``(name, weights, depth=None)``: a :class:`FoundationBackbone`.
  ``weights`` is the path of a local weights file (``.safetensors``, or a torch state dict read
  with ``weights_only=True``: nothing is unpickled) or the string ``"random"`` (tests and demos,
  warned about); nothing is ever downloaded. ``depth`` (tests only) builds fewer transformer
  blocks. A file whose keys or shapes do not match raises
  :class:`~wsi_anomaly.errors.WeightsUnavailableError` with one line naming the architecture.
- :class:`FoundationBackbone`: ``forward(x)`` takes float ``(B, 3, H, W)`` RGB in ``[0, 1]`` at
  any size, resamples it to ``input_px × input_px`` (bilinear or bicubic as the card's
  transform, with antialiasing), normalises it, runs the ViT (final norm included), drops the
  prefix tokens and returns the patch grid, float ``(B, D, g, g)`` with ``g = spec.grid`` (14
  for the /16 models, 16 for the /14 ones at 224 px). ``tile_embedding(x)`` returns the card's
  tile embedding ``(B, spec.embedding_dim)``; ``encode(x)`` returns both from one pass.
  Attributes: ``spec``, ``backbone_identity`` (``"<name>-random"`` or
  ``"<name>-file:<sha256 prefix>"``), ``weights_sha256`` (the file's full sha256, ``None`` for
  random weights). Always eval, frozen, no autograd.

The models (sources: the model cards on Hugging Face and TRIDENT's encoder definitions, which
load the same files into the same ``timm`` architectures with ``strict=True``):

- UNI (``MahmoodLab/UNI``): ViT-L/16, 224 px, ``init_values=1e-5`` (LayerScale), ImageNet
  mean/std, class token only; embedding = class token (1024).
- Virchow2 (``paige-ai/Virchow2``): ViT-H/14, 224 px, 4 register tokens, SwiGLU MLP packed in one
  ``fc1`` (``mlp_ratio=5.3375``, SiLU), ImageNet mean/std, bicubic resize; embedding = class
  token concatenated with the mean of the 256 patch tokens (2560).
- H-optimus-0 (``bioptimus/H-optimus-0``): ViT-g/14 with 4 registers (timm's
  ``vit_giant_patch14_reg4_dinov2``), 224 px, mean ``(0.707223, 0.578729, 0.703617)``, std
  ``(0.211883, 0.230117, 0.177517)``; embedding = class token (1536).
- Phikon-v2 (``owkin/phikon-v2``): a DINOv2 ViT-L/16 published as a Hugging Face ``transformers``
  ``Dinov2Model`` (its ``model.safetensors``), 224 px, ImageNet mean/std, no registers;
  embedding = ``last_hidden_state[:, 0]``, the class token (1024). It is built here as timm's
  ``vit_large_patch16_224`` (the same blocks: LayerScale, GELU MLP, pre-norm, final norm) and the
  ``transformers`` key names are mapped to timm's (``embeddings.*``, ``encoder.layer.<i>.*`` with
  separate query/key/value joined into ``qkv``, ``layernorm.*``; ``mask_token`` is dropped; an
  optional ``dinov2.`` prefix is removed). When the file's position embeddings cover another
  grid than 14×14 (``config.image_size`` other than 224), they are resampled once, bicubically,
  to 14×14 as timm does; ``transformers`` interpolates them at each forward instead, so the
  features agree up to that interpolation. A file already in timm's names is accepted as well.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsi_anomaly.errors import WeightsUnavailableError
from wsi_anomaly.models.weights import sha256_file

__all__ = [
    "FOUNDATION_MODELS",
    "FoundationBackbone",
    "FoundationSpec",
    "build_foundation",
    "dinov2_transformers_to_timm",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FoundationSpec:
    """One foundation model's architecture and conventions (see the module docstring)."""

    name: str
    label: str
    architecture: str
    #: keyword arguments of ``timm.create_model``; ``"mlp_layer": "swiglu_packed"`` and
    #: ``"act_layer": "silu"`` name timm's ``SwiGLUPacked`` and ``nn.SiLU`` (kept as data).
    timm_kwargs: Mapping[str, Any]
    input_px: int
    patch_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_prefix_tokens: int
    embed_dim: int
    embedding: Literal["cls", "cls+mean"] = "cls"
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    weights_layout: Literal["timm", "transformers-dinov2"] = "timm"
    card: str = ""
    #: what a user should pass, appended to every weights error
    weights_hint: str = field(default="", compare=False)

    @property
    def grid(self) -> int:
        """Patch tokens per side at ``input_px``."""
        return self.input_px // self.patch_px

    @property
    def embedding_dim(self) -> int:
        """Width of :meth:`FoundationBackbone.tile_embedding`."""
        return 2 * self.embed_dim if self.embedding == "cls+mean" else self.embed_dim

    def describe(self) -> str:
        """The expected architecture in one phrase, for messages."""
        return (
            f"{self.label}: timm {self.architecture} at {self.input_px} px, patch {self.patch_px}, "
            f"width {self.embed_dim}, {self.n_prefix_tokens - 1} register tokens"
        )


FOUNDATION_MODELS: dict[str, FoundationSpec] = {
    spec.name: spec
    for spec in (
        # https://huggingface.co/MahmoodLab/UNI (timm kwargs as on the card)
        FoundationSpec(
            name="uni",
            label="UNI (ViT-L/16)",
            architecture="vit_large_patch16_224",
            timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0},
            input_px=224,
            patch_px=16,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            n_prefix_tokens=1,
            embed_dim=1024,
            card="https://huggingface.co/MahmoodLab/UNI",
            weights_hint="the card's pytorch_model.bin",
        ),
        # https://huggingface.co/paige-ai/Virchow2: SwiGLUPacked + SiLU, 4 registers,
        # embedding = concat(class token, mean of patch tokens 5:)
        FoundationSpec(
            name="virchow2",
            label="Virchow2 (ViT-H/14, 4 registers)",
            architecture="vit_huge_patch14_224",
            timm_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "reg_tokens": 4,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "mlp_layer": "swiglu_packed",
                "act_layer": "silu",
            },
            input_px=224,
            patch_px=14,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            n_prefix_tokens=5,
            embed_dim=1280,
            embedding="cls+mean",
            interpolation="bicubic",
            card="https://huggingface.co/paige-ai/Virchow2",
            weights_hint="the card's pytorch_model.bin or model.safetensors",
        ),
        # https://huggingface.co/bioptimus/H-optimus-0: its own mean/std
        FoundationSpec(
            name="h-optimus-0",
            label="H-optimus-0 (ViT-g/14, 4 registers)",
            architecture="vit_giant_patch14_reg4_dinov2",
            timm_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "global_pool": "token",
            },
            input_px=224,
            patch_px=14,
            mean=(0.707223, 0.578729, 0.703617),
            std=(0.211883, 0.230117, 0.177517),
            n_prefix_tokens=5,
            embed_dim=1536,
            card="https://huggingface.co/bioptimus/H-optimus-0",
            weights_hint="the card's pytorch_model.bin or model.safetensors",
        ),
        # https://huggingface.co/owkin/phikon-v2: transformers Dinov2Model, CLS of
        # last_hidden_state, ImageNet mean/std
        FoundationSpec(
            name="phikon-v2",
            label="Phikon-v2 (ViT-L/16)",
            architecture="vit_large_patch16_224",
            timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0},
            input_px=224,
            patch_px=16,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            n_prefix_tokens=1,
            embed_dim=1024,
            weights_layout="transformers-dinov2",
            card="https://huggingface.co/owkin/phikon-v2",
            weights_hint="the card's model.safetensors (transformers Dinov2Model names)",
        ),
    )
}


def _timm_kwargs(spec: FoundationSpec, depth: int | None) -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    named = {"swiglu_packed": SwiGLUPacked, "silu": nn.SiLU}
    kwargs = {k: named.get(v, v) if isinstance(v, str) else v for k, v in spec.timm_kwargs.items()}
    kwargs["dynamic_img_size"] = False  # inputs are always resampled to input_px
    if depth is not None:
        kwargs["depth"] = int(depth)
    return kwargs


def _create(spec: FoundationSpec, depth: int | None, meta: bool) -> nn.Module:
    try:
        import timm
    except ImportError as exc:  # a dependency, but say so plainly if it is missing
        raise WeightsUnavailableError(
            "foundation models need timm: pip install 'timm>=1.0.15'"
        ) from exc
    kwargs = _timm_kwargs(spec, depth)
    if meta:
        with torch.device("meta"):
            return timm.create_model(spec.architecture, pretrained=False, **kwargs)
    return timm.create_model(spec.architecture, pretrained=False, **kwargs)


def dinov2_transformers_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``transformers`` ``Dinov2Model`` state dict to timm's ``VisionTransformer`` names.

    Separate ``query``/``key``/``value`` projections are concatenated (in that order) into
    ``qkv``; ``embeddings.mask_token`` is dropped; keys it does not know are kept as they are,
    so that the caller's key check reports them.
    """
    prefix = "dinov2." if any(k.startswith("dinov2.") for k in state) else ""
    renamed = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    block_parts = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for full_key, value in state.items():
        key = full_key[len(prefix) :] if prefix and full_key.startswith(prefix) else full_key
        if key == "embeddings.mask_token":
            continue
        if key in renamed:
            out[renamed[key]] = value
            continue
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "encoder" and parts[1] == "layer":
            block, rest = parts[2], ".".join(parts[3:])
            if rest.startswith("attention.attention."):
                which, kind = rest.split(".")[2:4]  # query|key|value, weight|bias
                qkv.setdefault((block, kind), {})[which] = value
                continue
            for hf_part, timm_part in block_parts.items():
                if rest.startswith(hf_part + "."):
                    suffix = rest[len(hf_part) :]
                    out[f"blocks.{block}.{timm_part}{suffix}"] = value
                    break
                if rest == hf_part:
                    out[f"blocks.{block}.{timm_part}"] = value
                    break
            else:
                out[full_key] = value
            continue
        out[full_key] = value
    for (block, kind), parts_ in qkv.items():
        if set(parts_) == {"query", "key", "value"}:
            out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(
                [parts_["query"], parts_["key"], parts_["value"]], dim=0
            )
        else:  # incomplete: keep what there is, the key check names it
            for which, value in parts_.items():
                out[f"encoder.layer.{block}.attention.attention.{which}.{kind}"] = value
    return out


def _read_state(path: Path, spec: FoundationSpec) -> Mapping[str, torch.Tensor]:
    help_text = f"expected {spec.describe()} ({spec.weights_hint}, from {spec.card})"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle refused, zip/header errors, permissions
        raise WeightsUnavailableError(
            f"cannot read foundation weights {str(path)!r} ({type(exc).__name__}); {help_text}"
        ) from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsUnavailableError(
            f"{str(path)!r} does not hold a state dict of tensors; {help_text}"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _match(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    spec: FoundationSpec,
    source: str,
) -> dict[str, torch.Tensor]:
    """``state`` renamed and cast to the reference's keys/dtypes, or one-line error."""
    if spec.weights_layout == "transformers-dinov2" and "embeddings.cls_token" in {
        k.removeprefix("dinov2.") for k in state
    }:
        state = dinov2_transformers_to_timm(state)
    state = dict(state)
    pos = state.get("pos_embed")
    ref_pos = reference.get("pos_embed")
    if (
        spec.weights_layout == "transformers-dinov2"
        and isinstance(pos, torch.Tensor)
        and ref_pos is not None
        and pos.ndim == 3
        and pos.shape[-1] == ref_pos.shape[-1]
        and pos.shape[1] != ref_pos.shape[1]
    ):
        from timm.layers import resample_abs_pos_embed

        side = math.isqrt(pos.shape[1] - spec.n_prefix_tokens)
        if side * side + spec.n_prefix_tokens == pos.shape[1]:
            state["pos_embed"] = resample_abs_pos_embed(
                pos.float(),
                new_size=[spec.grid, spec.grid],
                old_size=[side, side],
                num_prefix_tokens=spec.n_prefix_tokens,
            )
    problem = None
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing:
        problem = f"{len(missing)} keys missing, e.g. {missing[0]}"
    elif unexpected:
        problem = f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}"
    else:
        for key, ref in reference.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                problem = (
                    f"{key}: expected shape {tuple(ref.shape)}, found {tuple(state[key].shape)}"
                )
                break
    if problem is not None:
        raise WeightsUnavailableError(
            f"{source} is not a {spec.label} weights file ({problem}); expected {spec.describe()} "
            f"({spec.weights_hint}, from {spec.card})"
        )
    return {k: state[k].to(reference[k].dtype).contiguous() for k in reference}


class FoundationBackbone(nn.Module):
    """A frozen foundation ViT returning patch grids and tile embeddings (module docstring).

    Args:
        spec: the model's facts.
        vit: the timm ``VisionTransformer`` built from ``spec`` (weights already in it).
        backbone_identity: where the weights came from.
        weights_sha256: the weights file's sha256 (``None`` for random weights).
    """

    def __init__(
        self,
        spec: FoundationSpec,
        vit: nn.Module,
        backbone_identity: str,
        weights_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.vit = vit
        self.backbone_identity = backbone_identity
        self.weights_sha256 = weights_sha256
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FoundationBackbone:
        """Stay in eval mode whatever ``mode`` is (the backbone is frozen)."""
        return super().train(False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` → resampled to ``input_px`` and normalised."""
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"{self.spec.label} needs float B×3×H×W RGB images in [0, 1], "
                f"got {x.dtype} of shape {tuple(x.shape)}"
            )
        size = self.spec.input_px
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(
                x,
                size=(size, size),
                mode=self.spec.interpolation,
                align_corners=False,
                antialias=True,
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens ``(B, n_prefix_tokens + g², D)`` after the final norm."""
        forward_features: Any = self.vit.forward_features  # timm's VisionTransformer method
        tokens = forward_features(self.prepare(x))
        assert isinstance(tokens, torch.Tensor)
        return tokens

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.spec.n_prefix_tokens :]
        g = self.spec.grid
        b, n, d = patches.shape
        if n != g * g:  # cannot happen with the specs above; guards a wrong spec
            raise ValueError(f"{self.spec.label}: {n} patch tokens, expected {g}×{g}")
        return patches.transpose(1, 2).reshape(b, d, g, g)

    def _embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = tokens[:, 0]
        if self.spec.embedding == "cls+mean":
            return torch.cat([cls, tokens[:, self.spec.n_prefix_tokens :].mean(dim=1)], dim=-1)
        return cls

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._grid(self.tokens(x))

    @torch.no_grad()
    def tile_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The model card's tile embedding, ``(B, spec.embedding_dim)``."""
        return self._embedding(self.tokens(x))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patch grid (B, D, g, g), tile embedding (B, embedding_dim))`` from one pass."""
        tokens = self.tokens(x)
        return self._grid(tokens), self._embedding(tokens)


def reference_state(name: str, depth: int | None = None) -> dict[str, torch.Tensor]:
    """The keys and shapes (meta tensors, no memory) a weights file for ``name`` must hold."""
    return dict(_create(_spec(name), depth, meta=True).state_dict())


def _spec(name: str) -> FoundationSpec:
    try:
        return FOUNDATION_MODELS[name]
    except KeyError:
        raise WeightsUnavailableError(
            f"unknown foundation model {name!r}; choose one of {', '.join(FOUNDATION_MODELS)}"
        ) from None


def build_foundation(
    name: str, weights: str | Path, depth: int | None = None
) -> FoundationBackbone:
    """The frozen backbone ``name`` with weights from a local file, or ``"random"``.

    Args:
        name: a key of :data:`FOUNDATION_MODELS`.
        weights: path of a ``.safetensors`` file or a torch state dict (read with
            ``weights_only=True``), or ``"random"`` (explicitly: tests and demos only).
        depth: build only this many transformer blocks (tests; a real weights file then fails
            the key check).

    Raises:
        WeightsUnavailableError: unknown name, unreadable file, or keys/shapes that do not
            match (one line naming the expected architecture).
    """
    spec = _spec(name)
    if isinstance(weights, str) and weights == "random":
        logger.warning(
            "%s backbone uses RANDOM weights: features are meaningless for anomaly detection; "
            "use this only for tests and demos",
            spec.label,
        )
        return FoundationBackbone(spec, _create(spec, depth, meta=False), f"{spec.name}-random")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"foundation weights {str(weights)!r} are neither 'random' nor an existing file; "
            f"pass the local file of {spec.describe()} ({spec.weights_hint}, from {spec.card})"
        )
    vit = _create(spec, depth, meta=True)
    state = _match(_read_state(path, spec), vit.state_dict(), spec, repr(str(path)))
    # built on the meta device, then given the file's tensors: no random initialisation of
    # (up to) a billion parameters only to overwrite them
    vit.load_state_dict(state, strict=True, assign=True)
    digest = sha256_file(path)
    return FoundationBackbone(spec, vit, f"{spec.name}-file:{digest[:12]}", digest)
