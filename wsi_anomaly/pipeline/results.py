"""Results folders: a slide's folder name, what a finished folder records, and when it is reused."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError, WsiAnomalyError
from ..hashing import tagged_name
from ..outputs import is_owned, remove_path
from ..tiles.store import TileStore
from .discovery import _real_path
from .settings import DISPLAY_KEYS, HeatmapSettings

#: Marker kind of a slide's results folder (only such folders are replaced with --overwrite).
RESULT_KIND = "slide-results"


def output_name(slide: Path, out_root: Path, clash: bool = False) -> str:
    """The slide's results folder name under ``out_root``: its file name, unless another slide of
    the same name is in the same run (``clash``) or already owns that folder — then the name
    plus a short hash of the slide's full path, so two slides never share a folder."""
    slide = Path(slide)
    mine = str(_real_path(slide))
    hashed = tagged_name(slide.name, mine)
    if _recorded_slide_path(out_root / hashed) == mine:
        return hashed  # where an earlier run put it
    if not clash:
        owner = _recorded_slide_path(out_root / slide.name)
        if owner is None or owner == mine:
            return slide.name
    return hashed


def slide_output_dir(out_root: Path, slide: Path) -> Path:
    return Path(out_root) / output_name(Path(slide), Path(out_root))


def _is_results_folder(folder: Path) -> bool:
    """A slide results folder this tool wrote: its marker, or (older versions) its summary."""
    if is_owned(folder, (RESULT_KIND,)):
        return True
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(summary, dict)
        and "slide_fingerprint" in summary
        and "software_version" in summary
    )


def _recorded_slide_path(folder: Path) -> str | None:
    """The slide path a results folder records, or None when there is no readable record."""
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("slide_path")
    except (OSError, ValueError, AttributeError):
        return None


def cohort_output_names(paths: Sequence[str | Path], out_root: Path) -> list[str]:
    """One results folder name per slide: unique in the run and never another slide's folder."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[Path(p).name] = counts.get(Path(p).name, 0) + 1
    return [output_name(Path(p), out_root, clash=counts[Path(p).name] > 1) for p in paths]


@dataclass
class SlidePlan:
    """What one slide's run will do, decided before any tile is read."""

    slide_path: Path
    final: Path  # results/<name>/
    work: Path  # results/.<name>.<run>.partial/, renamed to ``final`` when complete
    slide_mpp: float | None  # the user's level-0 mpp override, if any
    identity: dict[str, Any]  # slide fingerprint + model sha256 + scoring settings


def recorded_identity(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary's identity in the current form: results of older versions kept the display
    settings among the scoring ones; they move to ``display`` here."""
    identity = dict(summary.get("identity") or {})
    scoring = dict(identity.get("scoring") or {})
    if "display" not in identity:
        identity["display"] = {k: scoring.pop(k) for k in DISPLAY_KEYS if k in scoring} or None
    identity["scoring"] = scoring
    return identity


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def identity_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What makes ``recorded`` other work than ``wanted`` (the display aside), for a refusal:
    ``slide content differs``, ``model differs: sha256 … → …``, and ``settings differ:`` with
    each differing setting and both values (``stride_px 128 → 256``)."""
    out = []
    if recorded.get("slide_fingerprint") != wanted["slide_fingerprint"]:
        out.append("slide content differs")
    if recorded.get("model_sha256") != wanted["model_sha256"]:
        old, new = recorded.get("model_sha256") or "none", wanted["model_sha256"] or "none"
        out.append(f"model differs: sha256 {str(old)[:12]} → {str(new)[:12]}")
    old_s, new_s = recorded.get("scoring") or {}, wanted["scoring"] or {}
    changed = [
        f"{key} {_show(old_s.get(key, 'unset'))} → {_show(new_s.get(key, 'unset'))}"
        for key in (*new_s, *(k for k in old_s if k not in new_s))
        if old_s.get(key, "unset") != new_s.get(key, "unset")
    ]
    if changed:
        out.append(f"settings differ: {', '.join(changed)}")
    return out


def reuse_decision(plan: SlidePlan, settings: HeatmapSettings) -> tuple[str, dict[str, Any]]:
    """What to do with what ``plan.final`` holds: ``("run", {})`` when there is nothing to reuse
    (or ``overwrite``), ``("done", summary)`` when it holds this very work, ``("redraw",
    summary)`` when it holds the same scores drawn otherwise; raises when it holds other work
    and not ``overwrite``, naming each setting that differs."""
    final = plan.final
    if not final.exists() and not final.is_symlink():
        return "run", {}
    if final.is_symlink() or not final.is_dir() or not _is_results_folder(final):
        raise OutputExistsError(
            f"{final} exists and is not a slide results folder written by "
            "wsi-anomaly; refusing to replace it (choose another --out)"
        )
    if settings.overwrite:
        return "run", {}
    try:
        summary = json.loads((final / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    recorded = recorded_identity(summary)
    differs = identity_differences(recorded, plan.identity)
    if differs:
        raise OutputExistsError(
            f"{final} holds results of other work ({'; '.join(differs)}); "
            "pass --overwrite to replace them, or choose another --out"
        )
    if recorded.get("display") != plan.identity.get("display"):
        return "redraw", summary
    summary["status"] = "skipped (done)"
    summary["output"] = str(final)
    return "done", summary


def _reusable_result(plan: SlidePlan, settings: HeatmapSettings) -> dict[str, Any] | None:
    """The finished summary when ``plan.final`` holds this very work; None when there is
    nothing to reuse, it is drawn otherwise (re-made here), or ``overwrite``; raises when it
    holds other work and not ``overwrite``."""
    decision, summary = reuse_decision(plan, settings)
    return summary if decision == "done" else None


def _ensure_work_dir(
    plan: SlidePlan, grid_plan: dict, min_tissue: float, leftovers: list[Path]
) -> Path | None:
    """Create this run's ``plan.work`` folder, taking over a matching, complete tile store (same
    content, grid and tissue threshold) from what an interrupted run left (``leftovers``,
    working folders of runs that are gone) or from the finished results; everything else the
    interrupted runs left is removed. Returns the reused store or None."""
    fingerprint = plan.identity["slide_fingerprint"]
    candidates = [p / "tiles.zarr" for p in leftovers if p.is_dir() and not p.is_symlink()]
    reusable = next(
        (
            p
            for p in (*candidates, plan.final / "tiles.zarr")
            if _store_matches(p, fingerprint, grid_plan, min_tissue)
        ),
        None,
    )
    remove_path(plan.work)
    plan.work.mkdir(parents=True)
    store = plan.work / "tiles.zarr"
    if reusable is not None and reusable.parent == plan.final:
        shutil.copytree(reusable, store)
    elif reusable is not None:
        os.replace(reusable, store)  # only the complete store moves over, nothing else
    for leftover in leftovers:
        remove_path(leftover)
    return store if reusable is not None else None


def _store_matches(store_path: Path, fingerprint: str, plan: dict, min_tissue: float) -> bool:
    """A complete tile store of the same slide, grid and tissue threshold can be reused."""
    try:
        attrs = TileStore(store_path).attrs
    except WsiAnomalyError:
        return False
    keys = ("level", "read_px", "read_stride_px", "tile_px")
    return (
        attrs.get("slide_fingerprint") == fingerprint
        and all(attrs.get(k) == plan[k] for k in keys)
        and attrs.get("settings", {}).get("min_tissue") == min_tissue
    )
