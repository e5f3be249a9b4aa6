"""Thumbnails of image versions, made on demand from the revision and cached.

Only raster formats Pillow decodes are read (never SVG, HTML or PDF), the input is bounded in
bytes and pixels (a decompression bomb is refused, not decoded), the work in time, and the
output is always a PNG this module wrote: nothing of the uploaded file reaches the browser.
"""

import asyncio
import io
import warnings
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from versionstore.models import Cloud, Version
from versionstore.service import VersionService

RASTER_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP"}
MAX_INPUT_BYTES = 40 << 20
MAX_PIXELS = 40_000_000
MAX_SECONDS = 10.0
EDGE = 320
CACHE_ENTRIES = 256
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # beyond it Pillow warns (an error here), beyond twice it refuses


def previewable_format(fmt: str | None) -> bool:
    return (fmt or "").lower() in RASTER_FORMATS


class NoPreview(Exception):
    """This version gets no preview (not a raster image, too large, undecodable, too slow)."""


def _thumbnail(path: Path, pillow_format: str, edge: int) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=[pillow_format]) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise NoPreview("too many pixels")
                image.draft("RGB", (edge, edge))  # JPEG: decode at a reduced scale
                image.thumbnail((edge, edge))
                converted = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
                out = io.BytesIO()
                converted.save(out, "PNG", optimize=False)
                return out.getvalue()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise NoPreview(f"decompression bomb refused: {exc}") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise NoPreview(f"not decodable: {exc}") from None


class Previews:
    def __init__(self, service: VersionService, edge: int = EDGE) -> None:
        self.service = service
        self.edge = edge
        self._cache: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._making: dict[tuple[str, str, int], asyncio.Future[bytes]] = {}

    @staticmethod
    def previewable(version: Version) -> bool:
        return previewable_format(version.format) and version.bytes <= MAX_INPUT_BYTES and version.backed_up

    async def png(self, cloud: Cloud, asset_id: str, version_id: str) -> bytes:
        """A PNG thumbnail of a backed-up image version (NoPreview when there is none)."""
        _public_id, version, store, key = await self.service.version_for_download(cloud, asset_id, version_id)
        if not self.previewable(version):
            raise NoPreview("not a raster image")
        cache_key = (cloud.name, version.digest, self.edge)
        if (cached := self._cache.get(cache_key)) is not None:
            self._cache.move_to_end(cache_key)
            return cached
        if (making := self._making.get(cache_key)) is not None:
            return await asyncio.shield(making)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._making[cache_key] = future
        try:
            async with self.service.local_copy(store, key, version.digest, verify=True) as path:
                if path is None:
                    raise NoPreview("the revision is missing")
                pillow_format = RASTER_FORMATS[(version.format or "").lower()]
                try:
                    png = await asyncio.wait_for(asyncio.to_thread(_thumbnail, path, pillow_format, self.edge), MAX_SECONDS)
                except TimeoutError:
                    raise NoPreview("took too long") from None
            future.set_result(png)
            self._cache[cache_key] = png
            if len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
            return png
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else NoPreview("cancelled"))
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            del self._making[cache_key]
