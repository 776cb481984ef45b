"""The client and `synthmri generate` with known channels, without a server: what goes on the wire
(multipart parts read back as NIfTI) and one-line errors for bad options."""

from __future__ import annotations

import gzip
import json
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest

from synthmri.cli import main
from synthmri.client import Client
from synthmri.given import GivenError
from tests.given_files import nifti, tumour


def capture(client: Client) -> list[httpx.Request]:
    """Answer every request with a queued job and keep the requests."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return httpx.Response(202, json={"id": "0" * 16, "state": "queued"})

    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    return seen


def parts(request: httpx.Request) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name, bytes) of a multipart request, in order."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=policy.default).parsebytes(head + request.content)
    return [(p.get_param("name", header="content-disposition"), p.get_filename(), p.get_payload(decode=True))
            for p in message.iter_parts()]  # fmt: skip


def test_submit_without_given_sends_json_and_with_given_multipart(tmp_path: Path) -> None:
    mask = tmp_path / "mask.nii.gz"
    mask.write_bytes(nifti(tumour()))
    t1ce = np.linspace(0, 1, 32 * 32 * 2, dtype=np.float32).reshape(32, 32, 2)
    with Client("http://synthmri.test", "key") as client:
        seen = capture(client)
        client.submit(channels="t1ce+seg", count=2, seed=None)
        client.submit(model="five", count=2, guidance=4.0,
                      given={"seg": mask, "t1ce": t1ce, "flair": [b"a", b"b"]})  # fmt: skip
    assert seen[0].headers["content-type"] == "application/json"
    assert json.loads(seen[0].content) == {"channels": "t1ce+seg", "count": 2}
    assert seen[1].headers["content-type"].startswith("multipart/form-data")
    fields = parts(seen[1])
    assert [(name, filename) for name, filename, _ in fields] == [
        ("request", None), ("seg", "mask.nii.gz"), ("t1ce", "t1ce.nii.gz"), ("flair", "flair_0"),
        ("flair", "flair_1"),
    ]  # fmt: skip
    assert json.loads(fields[0][2]) == {"model": "five", "count": 2, "guidance": 4.0}
    assert fields[1][2] == mask.read_bytes()
    volume = nib.Nifti1Image.from_bytes(gzip.decompress(fields[2][2]))
    np.testing.assert_array_equal(np.asarray(volume.dataobj), t1ce)
    np.testing.assert_array_equal(volume.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_submit_refuses_values_it_cannot_send(tmp_path: Path) -> None:
    with Client("http://synthmri.test", "key") as client:
        capture(client)
        with pytest.raises(GivenError, match="cannot read seg file"):
            client.submit(model="five", count=1, given={"seg": tmp_path / "missing.nii.gz"})
        with pytest.raises(GivenError, match="must be a file path, bytes or an array"):
            client.submit(model="five", count=1, given={"seg": 3})


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--given", "seg"], "write CHANNEL=FILE"),
        (["--given", "mask=m.nii.gz"], "unknown channel 'mask'"),
        (["--given", "seg=/no/such/file.nii.gz"], "no such file"),
        (["--guidance", "4"], "--guidance applies to known channels"),
    ],
)
def test_generate_cli_bad_given_options_are_one_line_errors(
    options: list[str], needle: str, capsys: Any
) -> None:
    argv = ["generate", "--url", "http://127.0.0.1:9", "--api-key", "k", "--channels", "t1ce+seg", "--count",
            "1", "--out", "out", *options]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
