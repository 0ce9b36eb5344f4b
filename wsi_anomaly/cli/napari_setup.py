"""``wsi-anomaly napari-setup``: make napari open results folders with this package's reader."""

from __future__ import annotations

import argparse

from ..errors import InvalidInputError
from .options import add_command

HELP = "make napari open results folders without asking which reader to use"
DESCRIPTION = """napari offers every reader that accepts folders for any folder and asks which
one to use. This records, once, in napari's own settings (Preferences → Plugins → File extension
readers), that folders named like results folders (<slide file name>/, e.g. slide.svs/, or
slide.svs-<hash>/) open with the wsi-anomaly reader, so that `napari results/<slide>/` and
viewer.open(folder) show the slide, heatmap and tiles directly. Other preferences are kept."""


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    add_command(
        sub,
        parents,
        "napari-setup",
        HELP,
        DESCRIPTION,
        run,
        examples=["wsi-anomaly napari-setup                 # then: napari results/slide.svs/"],
    )


def run(args: argparse.Namespace) -> int:
    try:
        import napari.settings  # noqa: F401
    except ImportError:
        raise InvalidInputError(
            "napari is not installed: pip install 'wsi-anomaly[napari]'"
        ) from None
    from ..napari_reader import prefer_for_results_folders, results_folder_patterns

    added = prefer_for_results_folders()
    patterns = results_folder_patterns()
    print(
        f"napari opens folders matching {', '.join(patterns[:3])}, … ({len(patterns)} "
        f"patterns, {len(added)} new) with the wsi-anomaly reader"
    )
    return 0
