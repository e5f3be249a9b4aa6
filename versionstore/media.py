"""What we can tell about an original from its name and first bytes, without decoding it."""

import mimetypes
import struct
from functools import lru_cache

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png", "image"),
    (b"\xff\xd8\xff", "jpg", "image"),
    (b"GIF87a", "gif", "image"),
    (b"GIF89a", "gif", "image"),
    (b"%PDF", "pdf", "image"),
    (b"\x1a\x45\xdf\xa3", "webm", "video"),
)


def sniff(head: bytes, filename: str | None) -> tuple[str | None, str]:
    """Return (format, resource_type guess) from magic bytes, then the file extension."""
    for magic, fmt, kind in _MAGIC:
        if head.startswith(magic):
            return fmt, kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp", "image"
    if head[4:8] == b"ftyp":
        return ("mp4", "video") if head[8:11] != b"hei" else ("heic", "image")
    ext = extension(filename)
    if ext:
        guessed = mimetypes.guess_type(f"x.{ext}")[0] or ""
        kind = guessed.split("/")[0]
        return ext, kind if kind in ("image", "video") else "raw"
    return None, "raw"


def extension(filename: str | None) -> str | None:
    if not filename or "." not in filename.rsplit("/", 1)[-1]:
        return None
    ext = filename.rsplit(".", 1)[-1].lower()
    return ext if ext.isalnum() and len(ext) <= 8 else None


def dimensions(head: bytes, fmt: str | None) -> tuple[int | None, int | None]:
    """Width and height from PNG/GIF headers; None where it would need a decoder."""
    if fmt == "png" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    if fmt == "gif" and len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        return width, height
    return None, None


@lru_cache(maxsize=1024)
def content_type(fmt: str | None) -> str:
    if fmt:
        guessed = mimetypes.guess_type(f"x.{fmt}")[0]
        if guessed:
            return guessed
    return "application/octet-stream"
