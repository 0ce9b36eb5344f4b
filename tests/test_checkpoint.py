"""Checkpoints are untrusted input: loaded as tensors and plain data only."""

from pathlib import Path

import pytest
import torch

from wsi_anomaly.checkpoint import load_checkpoint
from wsi_anomaly.errors import CheckpointError, UnsafeCheckpointError


class _RunsCode:
    """Unpickling this object calls ``Path.touch`` on a marker file: code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, tiny_model):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    payload = load_checkpoint(tiny_model)
    torch.save({**payload, "calibration": _RunsCode(marker)}, evil)
    # Control: an unrestricted load of this very file does run the code.
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_truncated_checkpoint_is_one_clear_error(tmp_path, tiny_model):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as info:
        load_checkpoint(cut)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_a_trained_checkpoint_is_plain_data(tiny_model):
    data = torch.load(tiny_model, weights_only=True)
    assert data["complete"] is True
