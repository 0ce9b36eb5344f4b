"""A checkpoint read once: its hash, identity and what the scorer and pictures take from it."""

from __future__ import annotations

import hashlib
import re

import pytest

from wsi_anomaly import loaded_model
from wsi_anomaly.errors import InputNotFoundError, UnsupportedSlideError
from wsi_anomaly.hashing import sha256_file, tagged_name
from wsi_anomaly.loaded_model import LoadedModel, load_model
from wsi_anomaly.score import Scorer, shared_scorer
from wsi_anomaly.slide import Slide, slide_fingerprint


def test_one_file_hash_for_checkpoints_and_weights(tmp_path):
    from wsi_anomaly.models.weights import sha256_file as weights_hash

    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(256)) * (9 << 10))  # > 2 blocks of 1 MiB
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert weights_hash is sha256_file


def test_tagged_name_keeps_same_named_inputs_apart():
    a, b = tagged_name("s.svs", "/x/s.svs"), tagged_name("s.svs", "/y/s.svs")
    assert re.fullmatch(r"s\.svs-[0-9a-f]{8}", a) and a != b
    assert a == tagged_name("s.svs", "/x/s.svs")


def test_slide_fingerprint_is_a_function_of_the_file(small_slide, tmp_path):
    with Slide(small_slide.path) as slide:
        assert slide.fingerprint() == slide_fingerprint(small_slide.path)
    with pytest.raises(InputNotFoundError, match="slide not found"):
        slide_fingerprint(tmp_path / "missing.svs")
    with pytest.raises(UnsupportedSlideError, match="folder"):
        slide_fingerprint(tmp_path)


def test_the_model_is_read_once_and_handed_to_the_scorer(tiny_model, tmp_path):
    loaded_model._cached.cache_clear()
    model = load_model(tiny_model)
    assert isinstance(model, LoadedModel) and load_model(tiny_model) is model
    assert model.sha256 == sha256_file(tiny_model)
    assert model.identity["model_sha256"] == model.sha256
    assert model.tile_mpp == 0.5 and model.tile_px == model.config.tile_px
    scorer = Scorer(model, device="cpu", batch_size=2)
    assert scorer.loaded is model and scorer.identity == model.identity
    assert scorer.calibration is model.calibration and scorer.map_px == model.map_px
    same = shared_scorer(model, device="cpu", batch_size=2)
    assert shared_scorer(model, device="cpu", batch_size=2) is same
    assert shared_scorer(model, device="cpu", batch_size=4) is not same
    with pytest.raises(InputNotFoundError):
        load_model(tmp_path / "missing.pt")
