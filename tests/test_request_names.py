"""`media_type` and `part_names` (http/inputs.py) answer exactly what aiohttp's
`request.content_type` and `part.name` / `part.filename` answer, for ordinary and odd headers:
they exist only to skip aiohttp's slow parsers on the upload path."""

import pytest
from aiohttp import hdrs
from aiohttp.multipart import BodyPartReader
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from versionstore.http.inputs import media_type, part_names

CONTENT_TYPES = [
    "multipart/form-data; boundary=----abc",
    "Multipart/Form-Data ; boundary=x",
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/X-WWW-FORM-URLENCODED",
    "text/plain;charset=latin-1",
]


@pytest.mark.parametrize("value", CONTENT_TYPES)
def test_media_type_is_what_aiohttp_says(value: str) -> None:
    request = make_mocked_request("POST", "/", headers={hdrs.CONTENT_TYPE: value})
    assert media_type(request) == request.content_type


def test_media_type_without_a_header() -> None:
    request = make_mocked_request("POST", "/")
    assert media_type(request) == request.content_type == "application/octet-stream"


DISPOSITIONS = [
    'form-data; name="public_id"',
    'form-data; name="file"; filename="photo.jpg"',
    "form-data; name=file; filename=plain.bin",
    'form-data; name="file"; filename*=UTF-8\'\'%C3%A9t%C3%A9.png',
    'form-data; name="file"; filename="a\\"b.png"',
    'form-data; name="file"; filename=""',
    'form-data; name="tags[0]"',
    "form-data",
    "attachment; filename=x",
    'form-data; name="a"; name="b"',
    "garbage;;;=",
]


class _NoContent:
    """A part whose body is never read here."""


@pytest.mark.parametrize("value", [*DISPOSITIONS, None])
def test_part_names_are_what_aiohttp_says(value: str | None) -> None:
    headers = CIMultiDictProxy(CIMultiDict({hdrs.CONTENT_DISPOSITION: value} if value is not None else {}))
    part = BodyPartReader(b"--x", headers, _NoContent())  # type: ignore[arg-type]
    assert part_names(part) == (part.name, part.filename)
