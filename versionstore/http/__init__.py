"""The HTTP layer: parse every encoding the SDKs send, call the domain, render Cloudinary JSON."""
