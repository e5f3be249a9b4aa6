"""The worked examples of the wire spec, section 3, computed by both SDKs."""

from versionstore import signing

SECRET = "secret456"


def test_worked_example_sha1_and_sha256():
    params = {"public_id": "docs/sample", "backup": "1", "overwrite": "1", "tags": "t1,t2", "type": "upload", "timestamp": 1700000000}
    to_sign = signing.string_to_sign(params)
    assert to_sign == "backup=1&overwrite=1&public_id=docs/sample&tags=t1,t2&timestamp=1700000000&type=upload"
    assert signing.sign(to_sign, SECRET) == "36415327b519d8bc9633ff916357d70018c48c65"
    assert signing.sign(to_sign, SECRET, "sha256") == "b41a2ff89dbaa17cbceb3eb9d6ab5306bfe7125dc4f8ff2b20d3ef7c7f91cd5c"


def test_version_2_escapes_ampersands_version_1_does_not():
    params = {"public_id": "a&b", "context": "alt=x&y", "timestamp": 1700000000}
    assert signing.string_to_sign(params, 2) == "context=alt=x%26y&public_id=a%26b&timestamp=1700000000"
    assert signing.string_to_sign(params, 1) == "context=alt=x&y&public_id=a&b&timestamp=1700000000"


def test_lists_join_with_commas_and_unsigned_keys_are_left_out():
    params = {"public_ids": ["a", "b"], "tag": "t", "command": "add", "timestamp": 1700000000,
              "api_key": "k", "file": "x", "resource_type": "image", "signature": "s", "empty": ""}
    assert signing.string_to_sign(params) == "command=add&public_ids=a,b&tag=t&timestamp=1700000000"


def test_verify_accepts_every_sdk_combination():
    params = {"public_id": "a&b", "timestamp": 1700000000}
    for version in (1, 2):
        for algorithm in ("sha1", "sha256"):
            signature = signing.sign(signing.string_to_sign(params, version), SECRET, algorithm)
            assert signing.verify(params, SECRET, signature)[0]
    assert not signing.verify(params, SECRET, "0" * 40)[0]


def test_notification_url_may_be_left_out_on_tag_endpoints():
    params = {"tag": "t", "timestamp": 1700000000, "notification_url": "http://x"}
    signature = signing.sign("tag=t&timestamp=1700000000", SECRET)
    assert not signing.verify(params, SECRET, signature)[0]
    assert signing.verify(params, SECRET, signature, optional_skip=True)[0]


def test_download_url_and_response_signatures():
    to_sign = signing.string_to_sign(
        {"timestamp": 1700000000, "asset_id": "b5e6d2b39ba3e0869d67141ba7dba6cf", "version_id": "5552aa79f5ecb2bde7c7a6e8b4b7f5c5"}
    )
    assert signing.sign(to_sign, SECRET) == "fcaf52db09a973a9c49ba3a3f9c8f70b4de27040"
    assert signing.response_signature("docs/sample", 1700000000, SECRET) == "39d451b3216ae7ee2c729f98756b9b91f068aa60"
