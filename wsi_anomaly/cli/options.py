"""Option helpers shared by the subcommands: argparse types, option groups, output checks.

One flag means one thing in every command that has it:

* ``--read-threads N``   slide-decoding threads (tile, heatmap);
* ``--loader-workers N`` DataLoader worker processes (train, score, mvtec);
* ``--workers N``        dask worker processes, one slide per task (heatmap only);
* ``--model FILE``       a checkpoint written by ``train`` (score, heatmap); the model family of
  ``train`` and ``mvtec`` is ``--family``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..models.registry import DEFAULT_FAMILY, family_sections

#: Model families that ``train`` and ``mvtec`` accept with ``--family``.

log = logging.getLogger("wsi_anomaly")


# -- argparse types ----------------------------------------------------------------------------
def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


#: Microns per pixel a slide or a tile resolution may have (a microscope's range).
MPP_RANGE = (0.05, 20.0)
#: Seeds every generator the package seeds accepts (numpy's are 32-bit).
SEED_MAX = 2**32 - 1


def mpp(text: str) -> float:
    """A resolution in µm/px: finite, in :data:`MPP_RANGE` (lower bound excluded)."""
    value = _number(text, float)
    low, high = MPP_RANGE
    if not low < value <= high:
        raise argparse.ArgumentTypeError(
            f"{text} µm/px is out of range (expected {low:g} < mpp ≤ {high:g})"
        )
    return value


def seed(text: str) -> int:
    """A seed: a whole number from 0 to 2³²−1."""
    value = _number(text, int)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is out of range (0 to {SEED_MAX})")
    return value


def port(text: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0 to 65535)")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1")
    return value


def colormap(text: str) -> str:
    """A colour map registered with matplotlib (checked now, not after a slide is scored)."""
    import matplotlib

    if text not in matplotlib.colormaps:
        raise argparse.ArgumentTypeError(
            f"unknown matplotlib colour map {text!r} (e.g. coolwarm, viridis, inferno, magma)"
        )
    return text


# -- options that no longer exist in a command -------------------------------------------------
class _Moved(argparse.Action):
    """A hidden option that stops parsing with one line naming the flag to use instead."""

    def __init__(self, option_strings, dest, hint: str = "", **kwargs):
        kwargs.update(nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None):
        hint = self.hint.format(value=values if values is not None else "NAME")
        command = parser.prog.split()[-1]
        parser.error(f"{option_string} is not an option of {command}: {hint}")


def add_moved_option(p: argparse.ArgumentParser, flag: str, hint: str) -> None:
    """``flag`` gives one error line with ``hint`` (``{value}`` is the value given)."""
    p.add_argument(flag, action=_Moved, hint=hint)


def add_moved_workers(p: argparse.ArgumentParser, right_flag: str, meaning: str) -> None:
    add_moved_option(
        p,
        "--workers",
        f"use {right_flag} N ({meaning}); --workers is the number of dask processes of heatmap",
    )


def add_moved_model(p: argparse.ArgumentParser) -> None:
    add_moved_option(
        p,
        "--model",
        "the model family is --family {value}; --model names a "
        "checkpoint file in score and heatmap",
    )


# -- subcommands ---------------------------------------------------------------------------------
#: The heading of the examples that end each command's --help.
EXAMPLES_HEADING = "examples:"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that the examples at the end keep their lines as written
    (the description is still reflowed to the terminal's width)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLES_HEADING):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def examples_epilog(examples: Sequence[str]) -> str:
    """The end of a --help: ``examples:`` and one command line per entry (a comment after
    two spaces and ``#`` is allowed)."""
    return "\n".join([EXAMPLES_HEADING, *(f"  {line}" for line in examples)])


def add_command(
    sub,
    parents: list[argparse.ArgumentParser],
    name: str,
    help: str,
    description: str,
    run,
    examples: Sequence[str] = (),
    interrupted: Callable[[argparse.Namespace], str] | None = None,
) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: ``help`` is its line in ``wsi-anomaly --help``,
    ``description`` the text of its own --help (reflowed), ``examples`` one or two command lines
    that end it, ``run(args)`` does its work; ``interrupted(args)`` says, after Ctrl-C, what is
    left and what a re-run reuses (default: nothing was kept)."""
    p = sub.add_parser(
        name,
        parents=parents,
        help=help,
        description=description,
        epilog=examples_epilog(examples) if examples else None,
        formatter_class=HelpFormatter,
    )
    p.set_defaults(func=run, interrupted=interrupted or nothing_kept)
    return p


def nothing_kept(args: argparse.Namespace) -> str:
    """After Ctrl-C, for a command whose outputs appear only when complete."""
    return "partial outputs were not kept; a re-run starts over"


# -- option groups ------------------------------------------------------------------------------
def common_parent() -> argparse.ArgumentParser:
    """-v/-q/--debug after the subcommand. Their defaults live on the main parser (so that
    ``wsi-anomaly -v heatmap …`` works too): here they are set only when given."""
    common = argparse.ArgumentParser(add_help=False)
    add_verbosity_options(common, default=argparse.SUPPRESS)
    return common


def add_verbosity_options(p: argparse.ArgumentParser, default: Any = False) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log the package's debug messages",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="warnings and errors only: no progress bars, no info messages",
    )
    p.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks for every error"
    )


def add_slide_mpp_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slide-mpp",
        type=positive_float,
        metavar="MPP",
        help="level-0 microns per pixel of the slide, overriding its metadata "
        "(needed when the slide has none)",
    )
    p.add_argument(
        "--mpp-csv",
        metavar="CSV",
        help="cohort overrides: a CSV with columns slide,mpp or TRIDENT's wsi,mpp "
        "(slide = file name, stem or path)",
    )


def slide_override(args: argparse.Namespace, slide: str) -> float | None:
    """The user's level-0 mpp for ``slide``: --slide-mpp, else its row of --mpp-csv."""
    if args.slide_mpp is not None:
        return args.slide_mpp
    if args.mpp_csv:
        from ..slide.resolution import load_mpp_csv, lookup_mpp

        return lookup_mpp(load_mpp_csv(args.mpp_csv), slide)
    return None


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto (CUDA if present, with bf16 autocast), cpu or cuda"
    )


def add_precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto (default): bf16 autocast on a GPU and on a CPU with native bf16 (AMX or "
        "AVX512-BF16), fp32 on other CPUs; scores agree with fp32's to Spearman ≥ 0.999",
    )


def add_runtime_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default="torch",
        help="torch (default), or onnx: ONNX Runtime on the CPU with the graph `wsi-anomaly "
        "export MODEL` wrote beside the checkpoint (MODEL with the .onnx suffix; needs "
        "pip install -e '.[onnx]')",
    )


def add_batch_size_option(p: argparse.ArgumentParser, default: int | None, what: str) -> None:
    shown = f" (default {default})" if default is not None else ""
    p.add_argument(
        "--batch-size", type=positive_int, default=default, metavar="N", help=f"{what}{shown}"
    )


def add_count_option(
    p: argparse.ArgumentParser,
    flag: str,
    what: str,
    default: int | None = None,
    shown: str | None = None,
    type: Any = positive_int,
    metavar: str = "N",
) -> None:
    """``flag N``, a number of things: the help is ``what`` and, in brackets, the default
    (``shown``, or else ``default <default>``)."""
    shown = shown or f"default {default}"
    p.add_argument(flag, type=type, default=default, metavar=metavar, help=f"{what} ({shown})")


def add_read_threads_option(
    p: argparse.ArgumentParser, what: str, workers_moved: bool = True
) -> None:
    """``--read-threads``; ``workers_moved``: ``--workers`` (not an option of this command)
    names it."""
    add_count_option(p, "--read-threads", what, shown="default: one per CPU core available")
    if workers_moved:
        add_moved_workers(p, "--read-threads", "slide-decoding threads")


def batch_size(text: str) -> int | str:
    """``auto`` or a whole number ≥ 1."""
    return "auto" if text == "auto" else positive_int(text)


def compile_mode(text: str) -> str:
    from ..score import COMPILE_MODES

    if text not in COMPILE_MODES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(COMPILE_MODES)}")
    return text


def add_out_folder_option(p: argparse.ArgumentParser, default: str) -> None:
    """``--out``, the folder a command writes its results into."""
    p.add_argument("--out", default=default, help=f"output folder (default {default}/)")


def add_scoring_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--batch-size N|auto``, ``--compile MODE`` and ``--backbone-weights FILE`` of the
    commands that score with a model."""
    p.add_argument(
        "--backbone-weights",
        metavar="FILE",
        help="the backbone weights file a model was fitted with, for models whose checkpoint "
        "records the backbone's sha256 instead of holding it (checked against that hash)",
    )
    p.add_argument(
        "--batch-size",
        type=batch_size,
        default="auto",
        metavar="N|auto",
        help=f"{what}; auto (default): 32 on a CPU, on a GPU the largest of 512, 256, … "
        "whose forward pass stays under 85%% of the GPU's memory",
    )
    p.add_argument(
        "--compile",
        type=compile_mode,
        default="off",
        metavar="MODE",
        help="torch.compile the model: off (default), default, max-autotune or "
        "reduce-overhead (CUDA graphs); the first batches are slow while it compiles",
    )


def scoring_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The scorer's keyword arguments from :func:`add_scoring_options`,
    :func:`add_device_option` and :func:`add_precision_option`: ``device``, ``precision``,
    ``batch_size``, ``compile`` and ``backbone_weights``."""
    return {
        "device": args.device,
        "precision": getattr(args, "precision", "auto"),
        "batch_size": args.batch_size,
        "compile": args.compile,
        "backbone_weights": args.backbone_weights,
        "engine": getattr(args, "runtime", "torch"),
    }


def add_loader_workers_option(
    p: argparse.ArgumentParser,
    default: int | None = None,
    what: str = "DataLoader worker processes",
) -> None:
    add_count_option(
        p,
        "--loader-workers",
        f"{what}; 0 loads in the main process",
        default,
        shown="default from the config" if default is None else None,
        type=non_negative_int,
    )
    add_moved_workers(p, "--loader-workers", "DataLoader worker processes")


def add_min_tissue_option(p: argparse.ArgumentParser, verb: str) -> None:
    """``--min-tissue``: ``verb`` (keep, score…) the tiles with at least this tissue fraction."""
    p.add_argument(
        "--min-tissue",
        type=fraction,
        default=0.5,
        help=f"{verb} tiles with at least this tissue fraction (default 0.5)",
    )


def add_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FILE", help="checkpoint written by `train`")


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="preset name (every family has a default and a fast one: "
        f"{', '.join(_preset_names())}) or YAML file (default: the family's default preset)",
    )


def add_seed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=seed, help="seed for everything (default from the config: 0)")


def _preset_names() -> list[str]:
    from ..config import PRESET_DIR

    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("qc_"))


def add_slides_arguments(p: argparse.ArgumentParser) -> None:
    """The slides of a cohort command (``heatmap``, ``qc``): files, folders or glob patterns,
    and ``--recursive`` (both found by :func:`wsi_anomaly.pipeline.find_slides`)."""
    p.add_argument(
        "slides",
        nargs="+",
        help="slide files, folders of slides, or glob patterns ('**' matches any depth; "
        "quote them)",
    )
    p.add_argument(
        "--recursive",
        action="store_true",
        help="also search the folders' sub-folders for slides (hidden folders, OUT and "
        "*.partial / *.zarr folders are skipped)",
    )


def add_family_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--family", metavar="FAMILY", help=help)
    add_moved_model(p)


def family_of_run(args: argparse.Namespace) -> str:
    """The family a run trains. A preset belongs to the family it names (``model.name``): with
    ``--config`` alone that family is trained (a preset says which model its settings are for);
    ``--family`` with a preset of another family is refused, since one family's schedule would
    silently run with the other's model."""
    from ..config import config_family

    named = config_family(args.config) if getattr(args, "config", None) else None
    if args.family is None:
        family = named or DEFAULT_FAMILY
        if named is not None:
            log.info("family %s, as the config %s names it", named, args.config)
        return family
    if named is not None and named != args.family:
        own = model_family(args.family)
        raise InvalidInputError(
            f"--config {args.config} is a preset of the {named} family, not of {args.family}: "
            f"leave out --family to train {named}, or pass a config of {args.family}, such as "
            f"{own.fast_preset or own.default_preset}"
        )
    return args.family


def family_for_inputs(inputs: str) -> str:
    """The first registered family (by name) whose models take ``inputs`` (``"images"`` or
    ``"tile features"``): the default family of a run given those inputs."""
    from ..models.registry import family_names, get_family

    if inputs == "images":
        return DEFAULT_FAMILY
    return next(name for name in family_names() if get_family(name).inputs == inputs)


def model_family(name: str, inputs: str | None = None):
    """The registered model family ``--family`` names (checked when the command runs, so that
    building the parser does not import the models); with ``inputs``, one whose models take
    those (``"images"`` for a command that has no tile features to give)."""
    from ..models.registry import family_names, get_family

    names = [n for n in family_names() if inputs is None or get_family(n).inputs == inputs]
    if name not in names:
        what = (
            f"a family of {get_family(name).inputs}, not {inputs}"
            if name in family_names()
            else "not a model family"
        )
        raise InvalidInputError(f"--family {name!r} is {what} (available: {', '.join(names)})")
    return get_family(name)


def add_qc_config_option(p: argparse.ArgumentParser) -> None:
    """``--qc-config``: the thresholds of the tissue QC flags."""
    p.add_argument(
        "--qc-config",
        metavar="NAME|FILE",
        help="tissue QC thresholds: a preset name (qc_default) or a YAML file; keys left out "
        "keep the preset's values (default qc_default)",
    )


def add_overwrite_option(
    p: argparse.ArgumentParser, help: str = "replace existing outputs"
) -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


# -- config overrides ----------------------------------------------------------------------------
def config_overrides(args: argparse.Namespace, schedule_section: str) -> dict:
    """Command-line values into a config: the schedule knobs (``--epochs``, ``--batch-size``,
    ``--lr``, ``--samples-per-epoch``) go to ``schedule_section`` (the chosen family's own
    section); a knob that section does not have is one error line."""
    model: dict = {"name": args.family}
    if getattr(args, "backbone_weights", None):
        model["backbone_weights"] = args.backbone_weights
    sections: dict[str, dict] = {"model": model, "train": {}, schedule_section: {}}
    settings = dict(family_sections()).get(schedule_section)
    own = {f.name for f in dataclasses.fields(settings)} if settings is not None else set()
    for name in ("epochs", "batch_size", "lr", "samples_per_epoch"):
        value = getattr(args, name, None)
        if value is None:
            continue
        if settings is not None and name not in own:
            flag = "--" + name.replace("_", "-")
            raise InvalidInputError(
                f"{flag} does not apply to the {schedule_section} schedule (its settings: "
                f"{', '.join(sorted(own))}); set them in --config"
            )
        sections[schedule_section][name] = value
    if getattr(args, "loader_workers", None) is not None:
        sections["train"]["workers"] = args.loader_workers
    out: dict = {key: section for key, section in sections.items() if section}
    if getattr(args, "seed", None) is not None:
        out["seed"] = args.seed
    return out


# -- outputs -------------------------------------------------------------------------------------
def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """``path`` will be written as a file: refuse an existing folder there."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(
            f"{flag} {path} is a folder; give a file name (e.g. {path / 'model.pt'})"
        )
    return path


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """``path`` will be a folder of outputs: refuse an existing file there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{flag} {path} is a file; give a folder for the outputs")
    return path


# -- dask ----------------------------------------------------------------------------------------
