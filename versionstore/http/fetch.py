"""Fetch a remote `file` URL into a spool file: streamed, size-limited, time-limited."""


import aiohttp

from versionstore.errors import BadRequest
from versionstore.spool import Spooled, SpoolFile


async def fetch_to_spool(session: aiohttp.ClientSession, url: str, spool: SpoolFile, timeout: float) -> Spooled:
    if not url.lower().startswith(("http://", "https://")):
        spool.discard()  # created by the caller; nothing else removes it
        raise BadRequest(f"Invalid file URL - {url}")
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=True) as response:
            if response.status != 200:
                raise BadRequest(f"Error in loading {url} - {response.status} {response.reason}")
            async for data in response.content.iter_chunked(256 * 1024):
                await spool.write(data)
    except (TimeoutError, aiohttp.ClientError) as exc:
        spool.discard()
        raise BadRequest(f"Error in loading {url} - {exc.__class__.__name__}") from None
    except BaseException:
        spool.discard()
        raise
    return await spool.finish()
