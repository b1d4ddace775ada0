"""The package version. Its major.minor is part of every stage fingerprint: bump the minor when a change alters
what a stage produces, so run folders do not serve artifacts of the old code."""

__version__ = "0.3.2"  # 0.3.2: stage records list their files; run folders carry a marker (fingerprints unchanged)
CACHE_VERSION = ".".join(__version__.split(".")[:2])
