"""The model card (eval.json) through the API: listed by /v1/models, applied to requests without a sampler."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from synthmri.hashing import checkpoint_sha256
from synthmri.jobstore import JobStore
from synthmri.modelcard import CARD_FILE, CARD_FORMAT_VERSION
from synthmri.settings import Settings
from tests.api.conftest import write_model

KEY = "card-key"


def write_card(model_dir: Path, sampler: str, steps: int, sha256: str | None = None) -> None:
    sha256 = sha256 or checkpoint_sha256(model_dir)
    card = {"format_version": CARD_FORMAT_VERSION, "checkpoint_sha256": sha256,
            "recommended": {"sampler": sampler, "steps": steps, "network_calls": steps},
            "headline": {"frechet_ratio_to_floor": 1.7, "isolated_tumour_pixels": 0.2}}
    (model_dir / CARD_FILE).write_text(json.dumps(card))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_card(write_model(root, "carded", "t1ce+seg"), "ddim", 30)
    write_card(write_model(root, "stale", "t1ce"), "ddpm", 100, sha256="0" * 64)
    return root


@pytest.fixture
def client(tmp_path: Path, models: Path, redis_url: str, store: JobStore) -> Iterator[TestClient]:
    settings = Settings(redis_url=redis_url, models_dir=models, results_dir=tmp_path / "results",
                        api_keys=KEY)  # type: ignore[arg-type]  # fmt: skip
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def test_models_list_the_card_of_these_weights_only(client: TestClient) -> None:
    listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert listed["carded"]["recommended"] == {"sampler": "ddim", "steps": 30}
    assert listed["carded"]["card"]["headline"]["frechet_ratio_to_floor"] == 1.7
    assert listed["stale"]["recommended"] is None and listed["stale"]["card"] is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, ("ddim", 30)),  # the recommendation
        ({"steps": 12}, ("ddim", 12)),  # the request's steps with the recommended sampler
        ({"sampler": "ddpm"}, ("ddpm", 1000)),  # another sampler: its own default, not 30
        ({"sampler": "ddim", "steps": 7}, ("ddim", 7)),
    ],
)
def test_requests_without_a_sampler_use_the_recommendation(
    client: TestClient, body: dict[str, object], expected: tuple[str, int]
) -> None:
    r = client.post("/v1/jobs", json={"model": "carded", "count": 1, **body})
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["sampler"], job["steps"]) == expected
    client.delete(f"/v1/jobs/{job['id']}")


def test_a_stale_card_is_not_applied(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"model": "stale", "count": 1}).json()
    assert (job["sampler"], job["steps"]) == ("dpm++", 20)
