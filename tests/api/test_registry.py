from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from synthmri.hashing import checkpoint_sha256
from synthmri.registry import RegistryError, resolve_model, scan_models, scan_registry
from synthmri.weights import WeightsError, verify_safetensors
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
    save_file({"w": np.ones(3, dtype=np.float32)}, str(a / "model.safetensors"))
    assert scan_models(tmp_path)["two"].sha256 == checkpoint_sha256(a) != two.sha256
    assert scan_models(tmp_path / "missing") == {}
    unavailable = scan_registry(tmp_path).unavailable
    assert sorted(unavailable) == ["broken", "empty"]
    assert unavailable["empty"].reason == "it has no model.safetensors"
    assert unavailable["broken"].reason == "its config.json is not a readable checkpoint config"
    assert str(tmp_path) not in repr(unavailable)


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
    with pytest.raises(RegistryError, match="no available model generates"):
        resolve_model({"two": models["two"]}, None, "t1+t1ce+t2+flair+seg")
    with pytest.raises(RegistryError, match="no models are installed"):
        resolve_model({}, None, "t1ce")


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 7])
    elif how == "garbage":
        path.write_bytes(b"this is not a safetensors file at all" * 3)
    elif how == "header":
        path.write_bytes(data[:8] + b"]" + data[9:])  # the first byte of the JSON header overwritten
    elif how == "trailing":
        path.write_bytes(data + b"\0" * 8)
    elif how == "nan":
        save_file({"w": np.array([0.5, np.nan], dtype=np.float32)}, str(path))
    elif how == "inf-bf16":
        # bfloat16 has no numpy dtype; write the bytes of +inf (0x7F80) by hand.
        header = b'{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00\x3f\x80\x7f")
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "garbage", "header", "trailing", "nan", "inf-bf16", "empty"])
def test_corrupt_weights_fail_verification(tmp_path: Path, how: str) -> None:
    d = write_model(tmp_path, "m", "t1ce+seg")
    assert verify_safetensors(d / "model.safetensors") == 1
    _corrupt(d / "model.safetensors", how)
    with pytest.raises(WeightsError) as e:
        verify_safetensors(d / "model.safetensors")
    assert str(e.value).startswith("model.safetensors ") and str(tmp_path) not in str(e.value)


def test_a_corrupt_model_is_never_chosen_and_says_why(tmp_path: Path) -> None:
    """`aaa` would win the tie by name, but its weights are truncated: requests by channel set go
    to the healthy model, and a request naming `aaa` is told why it cannot run."""
    write_model(tmp_path, "aaa", "t1ce+seg")
    write_model(tmp_path, "bbb", "t1ce+seg")
    assert resolve_model(scan_models(tmp_path), None, "t1ce+seg").name == "aaa"  # the tie rule: by name
    _corrupt(tmp_path / "aaa" / "model.safetensors", "truncated")
    registry = scan_registry(tmp_path)
    assert sorted(registry.models) == ["bbb"]
    down = registry.unavailable["aaa"]
    assert down.channel_set == "t1ce+seg" and "truncated" in down.reason
    for channels in ("t1ce+seg", "t1ce"):
        assert resolve_model(registry.models, None, channels, registry.unavailable).name == "bbb"
    with pytest.raises(RegistryError, match=r"model 'aaa' is unavailable: model.safetensors is truncated"):
        resolve_model(registry.models, "aaa", None, registry.unavailable)
    # With no healthy model of that channel set left, the error names the broken one.
    only = scan_registry(tmp_path)
    only.models.pop("bbb")
    with pytest.raises(RegistryError, match=r"no model on this server is available .*aaa: model.safetensors"):
        resolve_model(only.models, None, "t1ce+seg", only.unavailable)


def test_worker_load_faults_make_a_model_unavailable(tmp_path: Path) -> None:
    """Weights that pass the file checks but do not load (a worker reported it) count as broken
    until the checkpoint changes."""
    write_model(tmp_path, "aaa", "t1ce+seg")
    write_model(tmp_path, "bbb", "t1ce+seg")
    registry = scan_registry(tmp_path)
    faulty = registry.without_faults({registry.models["aaa"].sha256: "tensor 'x' has the wrong shape"})
    assert sorted(faulty.models) == ["bbb"]
    assert faulty.unavailable["aaa"].reason == "a worker could not load it: tensor 'x' has the wrong shape"
    assert resolve_model(faulty.models, None, "t1ce+seg", faulty.unavailable).name == "bbb"
    assert registry.without_faults({"0" * 64: "other checkpoint"}).models.keys() == {"aaa", "bbb"}


def test_an_unchanged_model_is_not_read_again_and_a_changed_one_is(tmp_path: Path) -> None:
    import json
    import os

    d = write_model(tmp_path, "two", "t1ce+seg")
    first = scan_models(tmp_path)["two"]
    assert scan_models(tmp_path)["two"] is first  # the last read, not a re-parse
    cfg = json.loads((d / "config.json").read_text())
    cfg["provenance"] = {"steps": 1}  # same length as {"steps": 0}: only the mtime tells
    (d / "config.json").write_text(json.dumps(cfg))
    st = (d / "config.json").stat()
    os.utime(d / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = scan_models(tmp_path)["two"]
    assert second.provenance == {"steps": 1} and second.sha256 != first.sha256
    (d / "eval.json").write_text("{}")  # a card appearing is a change too
    assert scan_models(tmp_path)["two"] is not second


def test_submissions_reuse_a_scan_for_a_second_then_see_new_models(tmp_path: Path) -> None:
    import asyncio

    from api.deps import ModelsView
    from synthmri.settings import Settings

    write_model(tmp_path, "two", "t1ce+seg")
    view = ModelsView(Settings(models_dir=tmp_path), max_age=60.0)  # type: ignore[arg-type]

    async def names() -> list[str]:
        return sorted((await view.recent()).models)

    assert asyncio.run(names()) == ["two"]
    first_scan = view.scanned_at
    write_model(tmp_path, "five", "t1+t1ce+t2+flair+seg")
    assert asyncio.run(names()) == ["two"] and view.scanned_at == first_scan  # within max_age
    view.max_age = 0.0
    assert asyncio.run(names()) == ["five", "two"] and view.scanned_at != first_scan
