"""Sage preference data: reading published data and its pair rule (:mod:`psalign.sage.pairs`), and
building new data for any model (``python -m psalign.sage build``, :mod:`psalign.sage.build`).

Every name of :mod:`psalign.sage.pairs` is importable from here.
"""

from .pairs import (
    RECORD_KEYS,
    Caption,
    PairPixels,
    PreferencePairDataset,
    SageImageName,
    SageUnit,
    Variant,
    build_preference_pairs,
    chosen_captions,
    images_drawn_from_caption,
    image_variant,
    load_preference_dataset,
    paired_crop_flip,
    parse_sage_image_name,
    parse_sage_record_name,
    read_preference_pairs,
    sage_image_name,
    sage_preference,
    sage_record_name,
    sage_stem,
    write_preference_pairs,
)

__all__ = [
    "RECORD_KEYS",
    "Caption",
    "PairPixels",
    "PreferencePairDataset",
    "SageImageName",
    "SageUnit",
    "Variant",
    "build_preference_pairs",
    "chosen_captions",
    "images_drawn_from_caption",
    "image_variant",
    "load_preference_dataset",
    "paired_crop_flip",
    "parse_sage_image_name",
    "parse_sage_record_name",
    "read_preference_pairs",
    "sage_image_name",
    "sage_preference",
    "sage_record_name",
    "sage_stem",
    "write_preference_pairs",
]
