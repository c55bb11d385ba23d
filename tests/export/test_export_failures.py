"""atop-export when a check fails: a non-zero exit, and no model.onnx left that the server would load."""

import json
import shutil

import pytest
from conftest import make_tiny_checkpoints

from atop_export.cli import main
from atop_server.repository import list_models


def test_a_failed_check_exits_non_zero_and_leaves_no_model_to_serve(tiny_repository, tmp_path):
    classifier, purifier = make_tiny_checkpoints(tmp_path)
    # A purifier recorded with no noise and no masking: the exported "randomized" defense always draws the
    # same, which the unpredictability check refuses (after parity, batch and RT checks have passed).
    record_path = purifier.with_name("purifier.json")
    record = json.loads(record_path.read_text())
    record["rt"] = {"noise_sigma": 0.0, "grid": 8, "mask_fraction": 0.0}
    record_path.write_text(json.dumps(record))
    args = ["--classifier", str(classifier), "--purifier", str(purifier), "--inputs", "float", "--parity-images", "4"]

    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit) as failed:
        main([*args, "--repository", str(fresh)])
    assert failed.value.code != 0 and "check failed" in str(failed.value.code)
    assert "draws repeat" in str(failed.value.code)
    assert sorted(p.name for p in fresh.rglob("*")) == []  # nothing staged is left, not even its folders

    # Over an existing repository: the model already there stays as it was, with its config and labels.
    existing = tmp_path / "existing"
    shutil.copytree(tiny_repository, existing)
    before = {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as failed_again:
        main([*args, "--repository", str(existing), "--name", "tiny"])
    assert "check failed" in str(failed_again.value.code)
    assert {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()} == before
    assert list_models(existing) == {"tiny": [1], "tiny_uint8": [1]}
