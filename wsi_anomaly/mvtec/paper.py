"""Numbers published in the HaloAE paper, to print beside ours. Percent, as in the paper.

Transcribed from the paper (Mathian et al., 2023): Table 1 (per-category image-level and
pixel-level ROC-AUC of HaloAE), and the mean rows of the ablation Tables 3 and 4.

Caveats worth printing next to these numbers: the authors' scoring script computed pixel AUROC on
masks and maps resized to 128×128 (our ``pixel_auroc_128_paper`` column), and flipped the labels
whenever an AUROC fell below 0.5 (we never do). Every number here was produced with the authors'
released halo attention layer, whose padding mask is inverted; ``haloae.released_mask: true`` is a
reproduction switch that restores that layer (it is not one of the paper's ablations), and
:func:`mask_note` says which layer a run used beside these numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config

#: HaloAE, Table 1: category → (image AUROC %, pixel AUROC %).
TABLE1_HALOAE: dict[str, tuple[float, float]] = {
    "carpet": (69.7, 89.4),
    "grid": (95.1, 83.1),
    "leather": (97.8, 98.5),
    "tile": (95.7, 78.5),
    "wood": (100.0, 91.1),
    "bottle": (100.0, 91.9),
    "cable": (84.6, 87.6),
    "capsule": (88.4, 97.8),
    "hazelnut": (99.8, 97.8),
    "metal_nut": (88.4, 85.2),
    "pill": (90.1, 91.5),
    "screw": (89.6, 99.0),
    "toothbrush": (97.2, 92.9),
    "transistor": (84.4, 87.5),
    "zipper": (99.7, 96.0),
}

#: Table 1 mean rows as printed: (image AUROC %, pixel AUROC %).
TABLE1_MEAN = (92.0, 91.2)
TABLE1_MEAN_TEXTURES = (91.7, 88.1)
TABLE1_MEAN_OBJECTS = (92.2, 92.7)

#: MVTec AD categories in the paper's order: textures first, then objects.
TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
OBJECTS = (
    "bottle",
    "cable",
    "capsule",
    "hazelnut",
    "metal_nut",
    "pill",
    "screw",
    "toothbrush",
    "transistor",
    "zipper",
)
CATEGORIES = TEXTURES + OBJECTS

#: Ablation means (image %, pixel %) for the variants our config can express.
#: Key: (haloae.loss_weighting, sorted haloae.loss_terms, haloae.attention). The paper's unweighted
#: sums (``L_fm + L_im``, ``L_cls`` alone, ``L_fm`` alone) are our ``equal`` weighting, which is
#: ``1/n`` over the ``n`` active terms (the sum up to a constant factor; one term alone is that
#: term unscaled); its α(t) rows are ``ews`` over the listed terms, renormalised over them so the
#: active weights sum to 1 (see :func:`wsi_anomaly.models.losses.loss_weights`).
#: Table 3 rows (loss function). Table 4 prints (91.4, 91.2) for the final model, Table 1 (92.0,
#: 91.2); we keep Table 1's.
#:
#: ``haloae.attention: conv`` has no paper counterpart and is deliberately absent: it replaces each
#: halo attention layer by a 3×3 convolution inside the same bottleneck blocks, whereas Table 4's
#: "Block C as CNN" (85.0 / 90.4) replaced the whole HaloNet auto-encoder by DFR's convolutional
#: auto-encoder, a different network.
#: The label of the published model itself among :data:`ABLATIONS`.
HEADLINE = "HaloAE (Table 1)"

ABLATIONS: dict[tuple[str, tuple[str, ...], str], tuple[str, tuple[float, float]]] = {
    ("ews", ("cls", "fm", "im"), "halo"): (HEADLINE, TABLE1_MEAN),
    ("equal", ("cls", "fm", "im"), "halo"): ("Table 3: equal weights", (79.0, 86.3)),
    ("ews", ("cls", "fm"), "halo"): ("Table 3: cls + fm (no image reconstruction)", (71.43, 79.1)),
    ("ews", ("cls", "im"), "halo"): ("Table 3: cls + im (no feature reconstruction)", (72.5, 82.2)),
    ("equal", ("fm", "im"), "halo"): ("Table 3: fm + im (no Cut&Paste classifier)", (76.8, 87.8)),
    ("equal", ("cls",), "halo"): ("Table 3: cls only", (82.9, 70.6)),
    ("equal", ("fm",), "halo"): ("Table 3: fm only", (79.6, 90.3)),
}

#: What ``haloae.attention: conv`` is, for tables and notes.
CONV_ATTENTION_LABEL = "attention layers replaced by 3×3 convolutions in the same blocks"


#: Published full-MVTec (image, pixel) AUROC % by model family (``model.name``): where they
#: were printed, per category, and the mean row. A family without an entry is never printed
#: beside another family's paper.
PUBLISHED: dict[str, tuple[str, dict[str, tuple[float, float]], tuple[float, float]]] = {
    "haloae": ("HaloAE paper, Table 1", TABLE1_HALOAE, TABLE1_MEAN),
}


def paper_category(category: str, family: str) -> tuple[float, float] | None:
    """The published (image, pixel) AUROC % of ``family`` for an MVTec category, or ``None``."""
    entry = PUBLISHED.get(family)
    return None if entry is None else entry[1].get(category)


def paper_reference(config: Config) -> tuple[str, tuple[float, float]] | None:
    """The paper's mean (image, pixel) AUROC % for the variant a :class:`Config` trains
    (``None`` for a family without published numbers).

    ``None`` for variants the paper did not report, among them ``haloae.attention: conv`` (see
    :data:`CONV_ATTENTION_LABEL`; not Table 4's "Block C as CNN"). ``haloae.released_mask`` does
    not change the key: it selects the attention layer the paper's numbers came from (see
    :func:`mask_note`).
    """
    if config.model.name not in PUBLISHED:
        return None
    h = config.haloae
    return ABLATIONS.get((h.loss_weighting, tuple(sorted(h.loss_terms)), h.attention))


def ablation_note(config: Config) -> str | None:
    """A footnote naming the paper's ablation a run reproduces, ``None`` for the published
    model itself, for a variant the paper did not report and for another family."""
    reference = paper_reference(config)
    if reference is None or reference[0] == HEADLINE:
        return None
    label, (img, pix) = reference
    return (
        f'This configuration is the paper\'s ablation "{label}": mean {img} image / {pix} pixel '
        "AUROC % (15 categories)."
    )


def configuration_notes(config: Config) -> list[str]:
    """Footnotes for a results table: what in this run's configuration differs from the runs
    behind the paper's numbers (HaloAE's attention layer; none for the other families)."""
    if config.model.name not in PUBLISHED:
        return []
    notes = []
    if config.haloae.attention == "conv":
        notes.append(
            f"This configuration ({CONV_ATTENTION_LABEL}) has no paper counterpart: "
            'the paper\'s Table 4 "Block C as CNN" replaced the whole HaloNet '
            "auto-encoder by DFR's convolutional auto-encoder, a different network. "
            "The paper columns are the full HaloAE's."
        )
    note = mask_note(config)
    if note is not None:
        notes.append(note)
    return notes


def mask_note(config: Config) -> str | None:
    """A footnote saying which halo attention layer a run used beside the paper's numbers.

    The paper's numbers came from the released layer with the inverted padding mask. ``None``
    when the run has no halo attention (``haloae.attention: conv``).
    """
    if config.haloae.attention != "halo":
        return None
    if config.haloae.released_mask:
        return (
            "Halo attention: this run uses the authors' released layer with its inverted "
            "padding mask (haloae.released_mask: true, a reproduction switch), the layer the "
            "paper's numbers were produced with."
        )
    return (
        "Halo attention: the paper's numbers came from the authors' released layer, whose "
        "padding mask is inverted; this run uses the corrected layer (haloae.released_mask: "
        "false), so the two columns differ in that layer as well."
    )


# -- ATAC-Net (the ATAC-Net paper), weakly supervised protocol; AUROC as fractions --------------
#: The ATAC-Net paper's Table 1 column names for each ``atacnet.variant``.
ATACNET_VARIANT_COLUMNS: dict[str, str] = {
    "cutmix_bce": "CutMix",
    "weighted_ce": "Weighted CE",
    "devnet": "Deviation Loss",
    "atacnet": "ATAC-Net",
}

#: ATAC-Net paper, Table 1 (general setting): category → (No. of anomalies as printed, CutMix, Weighted CE,
#: Deviation Loss, ATAC-Net) image AUROC.
ATACNET_TABLE1: dict[str, tuple[int, float, float, float, float]] = {
    "carpet": (5, 0.764, 0.803, 0.852, 0.924),
    "grid": (5, 0.729, 0.931, 0.947, 0.988),
    "leather": (5, 0.941, 0.984, 0.993, 1.000),
    "tile": (5, 0.902, 0.935, 0.987, 1.000),
    "wood": (5, 0.944, 0.988, 0.985, 0.996),
    "bottle": (3, 0.985, 0.991, 0.994, 1.000),
    "capsule": (5, 0.777, 0.914, 0.911, 0.934),
    "pill": (7, 0.824, 0.852, 0.866, 0.921),
    "transistor": (4, 0.815, 0.903, 0.923, 0.969),
    "zipper": (7, 0.927, 0.989, 0.990, 1.000),
    "cable": (8, 0.870, 0.864, 0.892, 0.983),
    "hazelnut": (4, 0.984, 1.000, 1.000, 1.000),
    "metal_nut": (4, 0.763, 0.952, 0.989, 1.000),
    "screw": (5, 0.855, 0.966, 0.970, 0.997),
    "toothbrush": (1, 0.863, 0.901, 0.861, 0.879),
}
#: ATAC-Net paper, Table 1 "MVTec-AD" row as printed (CutMix, Weighted CE, Deviation Loss, ATAC-Net).
ATACNET_TABLE1_MEAN = (0.862, 0.932, 0.944, 0.973)

#: ATAC-Net paper, Table 2 (hard setting: train on one known defect type): (category, type) →
#: {n labelled: (DevNet, DRA, ATAC-Net)} for one and ten anomalies. Rows "mean" as printed.
ATACNET_TABLE2: dict[tuple[str, str], dict[int, tuple[float, float, float]]] = {
    ("tile", "crack"): {1: (0.926, 0.975, 0.969), 10: (0.947, 0.986, 0.973)},
    ("tile", "glue_strip"): {1: (0.763, 0.872, 0.904), 10: (0.879, 0.942, 0.953)},
    ("tile", "gray_stroke"): {1: (0.621, 0.905, 0.913), 10: (0.884, 0.947, 0.943)},
    ("tile", "oil"): {1: (0.794, 0.891, 0.909), 10: (0.863, 0.933, 0.941)},
    ("tile", "rough"): {1: (0.752, 0.970, 0.968), 10: (0.932, 0.959, 0.984)},
    ("tile", "mean"): {1: (0.771, 0.923, 0.933), 10: (0.901, 0.935, 0.959)},
    ("metal_nut", "bent"): {1: (0.797, 0.952, 0.954), 10: (0.904, 0.990, 0.993)},
    ("metal_nut", "color"): {1: (0.909, 0.946, 0.961), 10: (0.978, 0.967, 0.982)},
    ("metal_nut", "flip"): {1: (0.764, 0.921, 0.945), 10: (0.987, 0.913, 0.991)},
    ("metal_nut", "scratch"): {1: (0.952, 0.909, 0.964), 10: (0.991, 0.911, 0.982)},
    ("metal_nut", "mean"): {1: (0.855, 0.932, 0.956), 10: (0.965, 0.945, 0.987)},
}


def atacnet_paper_columns(
    category: str, variant: str, setting: str, known_type: str | None, n_anomalies: int
) -> dict[str, float | None]:
    """The ATAC-Net paper's numbers to print beside one category of a weakly supervised run.

    General: Table 1's column for ``variant`` (and ATAC-Net's when the variant is an ablation).
    Hard: Table 2's DevNet / DRA / ATAC-Net for the known type, only at the run's own number of
    labelled anomalies when that is 1 or 10 (the two are separate experiments, each with its own
    labelled set; a run is comparable with one of them only); at both, labelled by their count,
    for any other number.
    """
    if setting == "general":
        row = ATACNET_TABLE1.get(category)
        names = list(ATACNET_VARIANT_COLUMNS)
        columns = [variant] + ([] if variant == "atacnet" else ["atacnet"])
        out: dict[str, float | None] = {"paper n anomalies": row[0] if row else None}
        for v in columns:
            out[f"paper {ATACNET_VARIANT_COLUMNS[v]}"] = row[1 + names.index(v)] if row else None
        return out
    row2 = ATACNET_TABLE2.get((category, known_type or ""))
    out = {}
    for n in (n_anomalies,) if n_anomalies in (1, 10) else (1, 10):
        for i, method in enumerate(("DevNet", "DRA", "ATAC-Net")):
            out[f"paper {method} ({n})"] = row2[n][i] if row2 else None
    return out
