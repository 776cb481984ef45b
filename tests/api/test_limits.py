"""What the API accepts: body size, media type, strict JSON types, bounded echoes, the OpenAPI
document's error answers. Real Redis, no worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from synthmri.contract import QUEUE
from synthmri.jobstore import JobStore
from synthmri.settings import Settings
from tests.api.conftest import write_model
from tests.api.test_problems import assert_problem

KEY = "unit-key"
LIMIT = 4096


@pytest.fixture
def client(tmp_path: Path, redis_url: str, store: JobStore) -> Iterator[TestClient]:
    write_model(tmp_path / "models", "tiny", "t1ce+seg")
    settings = Settings(redis_url=redis_url, models_dir=tmp_path / "models", results_dir=tmp_path / "results",
                        api_keys=KEY, max_count=8, max_request_bytes=LIMIT)  # type: ignore[arg-type]  # fmt: skip
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


JSON = "application/json"


def post_raw(client: TestClient, body: bytes | Iterator[bytes], content_type: str | None = JSON) -> Any:
    headers = {"content-type": content_type} if content_type else {}
    return client.post("/v1/jobs", content=body, headers=headers)


def test_large_bodies_are_413_whether_declared_or_streamed(client: TestClient, store: JobStore) -> None:
    huge = json.dumps({"channels": "t1ce", "count": 1, "pad": "x" * (10 << 20)}).encode()
    r = post_raw(client, huge)
    assert_problem(r, 413, f"({LIMIT} bytes)")
    assert len(r.content) < 400

    def streamed() -> Iterator[bytes]:  # no Content-Length: counted as it is read
        yield b'{"channels": "t1ce", "count": 1, "pad": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}'

    assert_problem(post_raw(client, streamed()), 413, "send a smaller request")
    assert store.r.llen(QUEUE) == 0
    assert post_raw(client, json.dumps({"channels": "t1ce", "count": 1}).encode()).status_code == 202


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_bodies_neither_json_nor_multipart_are_415(client: TestClient, content_type: str | None) -> None:
    r = post_raw(client, b'{"channels": "t1ce", "count": 1}', content_type)
    assert_problem(r, 415, "Content-Type: application/json")
    assert "multipart/form-data" in r.json()["detail"]
    assert (content_type or "no Content-Type") in r.json()["detail"]


def test_json_sent_as_multipart_is_422(client: TestClient) -> None:
    """multipart/form-data carries known channels (tests/api/test_uploads.py); bare JSON is not multipart."""
    r = post_raw(client, b'{"channels": "t1ce", "count": 1}', "multipart/form-data")
    assert_problem(r, 422, "multipart body cannot be read")


def test_json_media_types_with_parameters_are_accepted(client: TestClient) -> None:
    body = b'{"channels": "t1ce", "count": 1}'
    assert post_raw(client, body, "application/json; charset=utf-8").status_code == 202
    assert post_raw(client, body, "application/vnd.synthmri+json").status_code == 202


@pytest.mark.parametrize(
    ("field", "value"),
    [("count", "1"), ("count", True), ("count", 1.5), ("seed", "7"), ("seed", False), ("steps", "4"),
     ("formats", "png"), ("channels", 1)],
)  # fmt: skip
def test_json_types_are_strict(client: TestClient, field: str, value: Any) -> None:
    body = {"channels": "t1ce", "count": 1, field: value}
    r = client.post("/v1/jobs", json=body)
    assert_problem(r, 422, f"{field}: ")
    assert r.json()["errors"][0]["loc"] == ["body", field]


def test_an_integral_number_is_an_integer(client: TestClient, store: JobStore) -> None:
    """JSON Schema's `integer` includes 2.0; the job records it as the integer 2."""
    r = client.post("/v1/jobs", json={"channels": "t1ce", "count": 2.0, "seed": 5.0})
    assert r.status_code == 202, r.text
    assert (r.json()["count"], r.json()["seed"]) == (2, 5)


def test_422_repeats_little_of_a_large_or_odd_request(client: TestClient) -> None:
    long_value = "t" * 3000
    for body in (
        {"channels": long_value, "count": 1},
        {"model": long_value, "count": 1},
        {"channels": "t1ce", "count": 1, long_value: 1},
        {"channels": "t1ce", "count": 1, **{f"extra{i}": i for i in range(200)}},
    ):
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        assert long_value[:200] not in r.text and len(r.content) < 4000, len(r.content)
        assert len(r.json()["errors"]) <= 20
    r = client.post("/v1/jobs", json={"channels": "t1ce", "count": 1, **{f"extra{i}": i for i in range(200)}})
    assert r.json()["detail"].endswith("and 180 more")


def test_openapi_lists_problem_answers_and_this_servers_limits(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    problem = doc["components"]["schemas"]["ProblemDetails"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "instance"}
    expected = {
        ("/v1/jobs", "post"): {"401", "413", "415", "422", "429", "503"},
        ("/v1/jobs", "get"): {"401", "422", "503"},
        ("/v1/jobs/{job_id}", "get"): {"401", "404", "422", "503"},
        ("/v1/jobs/{job_id}", "delete"): {"401", "404", "422", "503"},
        ("/v1/jobs/{job_id}/cancel", "post"): {"401", "404", "409", "422", "503"},
        ("/v1/jobs/{job_id}/archive.zip", "get"): {"401", "404", "409", "410", "422", "503"},
        ("/v1/jobs/{job_id}/nnunet.zip", "get"): {"401", "404", "409", "410", "422", "503"},
        ("/readyz", "get"): {"503"},
        ("/metrics", "get"): {"503"},
    }
    for (path, method), codes in expected.items():
        responses = doc["paths"][path][method]["responses"]
        errors = {code for code in responses if code[0] in "45"}
        assert errors == codes, (path, method, errors)
        for code in codes:
            content = responses[code]["content"]
            assert list(content) == ["application/problem+json"], (path, method, code)
            ref = content["application/problem+json"]["schema"]["$ref"]
            assert ref.endswith("/ValidationProblem" if code == "422" else "/ProblemDetails")
    grid = doc["paths"]["/v1/jobs/{job_id}/grid.png"]["get"]["responses"]["200"]["content"]
    assert list(grid) == ["image/png"]
    request = doc["components"]["schemas"]["JobRequest"]
    assert request["properties"]["count"]["maximum"] == 8
    channels = next(o for o in request["properties"]["channels"]["anyOf"] if o.get("type") == "string")
    assert channels["enum"] == ["t1ce", "t1ce+seg"]  # what the installed t1ce+seg model can serve
    seed = next(o for o in request["properties"]["seed"]["anyOf"] if o.get("type") == "integer")
    assert seed["maximum"] == 2**63 - 1 and isinstance(seed["maximum"], int)
    nnunet = doc["paths"]["/v1/jobs/{job_id}/nnunet.zip"]["get"]["responses"]["200"]["content"]
    assert list(nnunet) == ["application/zip"]


@pytest.mark.parametrize(
    ("body", "accepted"),
    [
        ({"channels": "t1ce+seg", "count": 1, "formats": ["nifti", "nnunet"]}, True),
        ({"model": "tiny", "count": 1, "formats": ["nnunet", "nifti", "png"]}, True),
        ({"channels": "t1ce", "count": 1, "formats": ["png"]}, True),
        ({"channels": "t1ce+seg", "count": 1}, True),
        ({"channels": "t1ce+seg", "count": 1, "formats": ["png", "nnunet"]}, False),  # built from the NIfTIs
        ({"channels": "t1ce", "count": 1, "formats": ["nifti", "nnunet"]}, False),  # no seg, no labels
        ({"model": "flat", "count": 1, "formats": ["nifti", "nnunet"]}, False),  # a model without seg
        ({"model": "flat", "count": 1}, True),
        ({"count": 1}, False),
    ],
)
def test_openapi_states_which_requests_this_server_takes(
    client: TestClient, tmp_path: Path, body: dict[str, Any], accepted: bool
) -> None:
    """A client keeping to the document gets no 422: the schema and the server agree."""
    import jsonschema_rs  # schemathesis's validator (a dev dependency)

    write_model(tmp_path / "models", "flat", "t1ce")  # beside the fixture's tiny (t1ce+seg)
    assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["flat", "tiny"]
    request = client.get("/openapi.json").json()["components"]["schemas"]["JobRequest"]
    assert jsonschema_rs.Draft202012Validator(request).is_valid(body) == accepted
    r = client.post("/v1/jobs", json=body)
    assert (r.status_code != 422) == accepted, r.text
    if body.get("model") == "flat" and not accepted:
        assert "nnunet format cannot be made from model 'flat': no seg channel" in r.json()["detail"]
