"""versionstore: a self-hosted asset version-history store speaking Cloudinary's API."""

__version__ = "0.2.0"
