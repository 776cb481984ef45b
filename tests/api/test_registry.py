from __future__ import annotations

from pathlib import Path

import pytest

from synthmri.hashing import checkpoint_sha256
from synthmri.registry import RegistryError, resolve_model, scan_models
from tests.api.conftest import write_model


def test_scan_reads_configs_and_skips_broken_dirs(tmp_path: Path) -> None:
    a = write_model(tmp_path, "two", "t1ce+seg")
    write_model(tmp_path, "five", "t1+t1ce+t2+flair+seg")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"x")
    models = scan_models(tmp_path)
    assert sorted(models) == ["five", "two"]
    two = models["two"]
    assert (two.channel_set, two.channels, two.image_size, two.diffusion_steps) == (
        "t1ce+seg",
        ("t1ce", "seg"),
        32,
        1000,
    )
    assert two.sha256 == checkpoint_sha256(a) and two.public()["default_steps"]["dpm++"] == 20
    (a / "model.safetensors").write_bytes(b"changed weights")
    assert scan_models(tmp_path)["two"].sha256 == checkpoint_sha256(a) != two.sha256
    assert scan_models(tmp_path / "missing") == {}


def test_resolve_exact_superset_and_errors(tmp_path: Path) -> None:
    write_model(tmp_path, "two", "t1ce+seg")
    write_model(tmp_path, "five", "t1+t1ce+t2+flair+seg")
    models = scan_models(tmp_path)
    assert resolve_model(models, None, "t1ce+seg").name == "two"
    assert resolve_model(models, None, "t1ce").name == "two"  # smallest superset
    assert resolve_model(models, "five", "t1ce+seg").name == "five"
    with pytest.raises(RegistryError, match="unknown model 'x'; available: five, two"):
        resolve_model(models, "x", None)
    with pytest.raises(RegistryError, match="does not include"):
        resolve_model({"two": models["two"]}, "two", "t1+t1ce+t2+flair+seg")
    with pytest.raises(RegistryError, match="no installed model generates"):
        resolve_model({"two": models["two"]}, None, "t1+t1ce+t2+flair+seg")
    with pytest.raises(RegistryError, match="no models are installed"):
        resolve_model({}, None, "t1ce")
