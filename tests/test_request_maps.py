"""The maps the read path keeps of what a request names: the resolved route of a path
(`routes.dispatch`) and the parsed query string (`inputs`). A repeated path or query skips the
work, answers exactly as before, and the maps stay bounded whatever a client sends."""

import pytest
from aiohttp.test_utils import TestClient, make_mocked_request

from tests.conftest import BASIC_HEADERS, CLOUD, Api
from versionstore.http import inputs, routes


async def test_repeated_paths_answer_as_the_walk_does_and_the_map_stays_bounded(
    api: Api, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(routes, "_RESOLVED_MAX", 8)
    routes._RESOLVED.clear()
    await api.upload(b"bytes", public_id="rc/a", tags="t0")
    for n in range(20):  # ever new paths: the map is dropped when full, never grows past it
        body = await api.admin("GET", f"resources/image/upload/rc/missing{n}", expect=404)
        assert body["error"]["message"] == f"Resource not found - rc/missing{n}"
        assert len(routes._RESOLVED) <= 8
    await api.admin("GET", f"resources/image/upload/{'x' * 600}", expect=404)
    assert all(len(path) <= routes._RESOLVED_PATH for _, path in routes._RESOLVED)
    for _ in range(2):  # the second time from the map: same answers, the method decides the handler
        assert (await api.admin("GET", "resources/image/upload/rc/a"))["tags"] == ["t0"]
        assert (await api.admin("POST", "resources/image/upload/rc/a", data={"tags": "t1"}))["tags"] == ["t1"]
        assert (await api.admin("GET", "resources/image/upload/rc/a"))["tags"] == ["t1"]
        await api.admin("POST", "resources/image/upload/rc/a", data={"tags": "t0"})
        refused = await client.patch(f"/v1_1/{CLOUD}/resources/image/upload/rc/a", headers=BASIC_HEADERS)
        assert refused.status == 404
        assert (await refused.json())["error"]["message"] == "Method not supported for this path"
        unknown = await client.get("/v1_1/nobody/resources/image/upload/rc/a", headers=BASIC_HEADERS)
        assert unknown.status == 401  # the environment is looked up on every request, cached path or not
    assert ("GET", f"/v1_1/{CLOUD}/resources/image/upload/rc/a") in routes._RESOLVED


def test_parsed_query_strings_are_reused_as_new_dicts_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "_QUERIES", 4)
    inputs._QUERY_CACHE.clear()
    first = inputs.query_params(make_mocked_request("GET", "/x?versions=true&max_results=5&blank="))
    first["versions"] = "changed by the first request"
    again = inputs.query_params(make_mocked_request("GET", "/x?versions=true&max_results=5&blank="))
    assert again == {"versions": "true", "max_results": "5"}  # parsed as before, blank dropped, not shared
    kept = len(inputs._QUERY_CACHE)
    listed = inputs.query_params(make_mocked_request("GET", "/x?tags[]=a&tags[]=b"))
    assert listed == {"tags": ["a", "b"]} and len(inputs._QUERY_CACHE) == kept  # lists grow later: not kept
    assert inputs.query_params(make_mocked_request("GET", "/x?q=%20a%26")) == {"q": " a&"}
    for n in range(10):
        inputs.query_params(make_mocked_request("GET", f"/x?n={n}"))
        assert len(inputs._QUERY_CACHE) <= 4
    inputs.query_params(make_mocked_request("GET", "/x?long=" + "y" * 3000))
    assert all(len(raw) <= inputs._QUERY_CHARS for raw in inputs._QUERY_CACHE)
