from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from synthmri.settings import Settings


def test_api_keys_are_split_and_kept_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    pre = hashlib.sha256(b"k3").hexdigest()
    monkeypatch.setenv("SYNTHMRI_API_KEYS", f" k1 ,k2,,sha256:{pre.upper()}")
    s = Settings()
    assert s.api_keys == {hashlib.sha256(b"k1").hexdigest(), hashlib.sha256(b"k2").hexdigest(), pre}
    assert "k1" not in repr(s) and s.key_is_valid("k3") and not s.key_is_valid("k4")
    # The child-process environment carries hashes only, and round-trips.
    env = s.as_env()
    assert "k1" not in env["SYNTHMRI_API_KEYS"].split(",")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert Settings() == s


def test_bad_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTHMRI_API_KEYS", "sha256:abc")
    with pytest.raises(ValidationError, match="64 hex digits"):
        Settings()
    monkeypatch.delenv("SYNTHMRI_API_KEYS")
    monkeypatch.setenv("SYNTHMRI_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        Settings()


def test_every_field_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 20, name
