"""The support console's domain: staff accounts, their sessions, the audit log, finding assets.

Nothing here imports aiohttp; the pages are versionstore/http/console_views.py.
"""
