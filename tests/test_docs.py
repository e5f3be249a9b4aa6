"""Docs are part of the change: every route and every setting must be documented."""

import re
from dataclasses import fields
from pathlib import Path

import yaml

from versionstore.config import Config
from versionstore.http.routes import ROUTES

ROOT = Path(__file__).resolve().parent.parent


def test_every_route_is_in_the_api_doc():
    doc = (ROOT / "docs" / "api.md").read_text()
    for _, pattern, _ in ROUTES:
        documented = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: f"<{m[1]}>", pattern)
        assert f"`{documented}`" in doc, f"route {documented} is not documented in docs/api.md"


def test_every_setting_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    documented = {"data_dir": "--data-dir", "host": "--host", "port": "--port"}
    for field in fields(Config):
        name = documented.get(field.name, f"VERSIONSTORE_{field.name.upper()}")
        assert name in readme, f"setting {field.name} ({name}) is not documented in README.md"


def test_every_route_and_method_is_in_the_openapi_document():
    """The fuzzer (tests/test_fuzz_schema.py) reaches only what the document describes."""
    spec = yaml.safe_load((ROOT / "versionstore" / "openapi.yaml").read_text())
    for methods, pattern, _handler in ROUTES:
        path = "/v1_1/{cloud_name}/" + re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: f"{{{m[1]}}}", pattern)
        assert path in spec["paths"], f"{path} is not in versionstore/openapi.yaml"
        for method in methods.split("|"):
            assert method.lower() in spec["paths"][path], f"{method} {path} is not in versionstore/openapi.yaml"
