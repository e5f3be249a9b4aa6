"""Format and dimensions from the first bytes, and the upload answer built from them."""

import hashlib
from pathlib import Path

import blake3

from versionstore import media

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "rgb-3x2.png"


def test_fixture_matches_its_recorded_digest():
    readme = (FIXTURE.parent / "README.md").read_text()
    assert blake3.blake3(FIXTURE.read_bytes()).hexdigest() in readme


def test_sniff_prefers_magic_bytes_over_the_name():
    head = FIXTURE.read_bytes()[:64]
    assert media.sniff(head, "misleading.txt") == ("png", "image")
    assert media.dimensions(head, "png") == (3, 2)
    assert media.sniff(b"hello", "notes.txt") == ("txt", "raw")
    assert media.sniff(b"\x00\x00\x00\x18ftypmp42", None) == ("mp4", "video")
    assert media.sniff(b"hello", None) == (None, "raw")


async def test_auto_upload_of_a_png_reports_image_and_size(api):
    body = await api.upload(FIXTURE.read_bytes(), rt="auto", filename="rgb.png", public_id="fx/rgb")
    assert (body["resource_type"], body["format"], body["width"], body["height"]) == ("image", "png", 3, 2)
    assert body["etag"] == hashlib.md5(FIXTURE.read_bytes()).hexdigest()  # Cloudinary's etag
    assert body["blake3"] == blake3.blake3(FIXTURE.read_bytes()).hexdigest()  # our content address
