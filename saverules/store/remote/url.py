"""An fsspec URL or a plain path, opened as (file system, root path inside it).

Credentials and endpoints come from the environment each backend reads
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``
...), never from the policy file: storage options that look like a secret are
refused with an error that says where they belong.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...engine.policy import SECRET_OPTIONS
from ..errors import CheckpointError

#: The extra that brings each protocol's fsspec implementation.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def check_options(options: Mapping[str, Any], where: str = "the storage options") -> dict[str, Any]:
    """``options`` as a dict; CheckpointError naming a key that holds a credential."""
    for key in options:
        if str(key).lower() in SECRET_OPTIONS:
            raise CheckpointError(
                f"saverules: {where} set {key!r}, a credential; credentials never go in a policy or in code "
                "that is committed: set them in the environment the backend reads (AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL for S3, GOOGLE_APPLICATION_CREDENTIALS for GCS)"
            )
    return dict(options)


def open_url(url: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec file system, root path) of ``url``; CheckpointError when its backend is not installed."""
    try:
        import fsspec.core
    except ImportError:
        raise CheckpointError(
            "saverules: a durable tier needs fsspec: pip install 'saverules[s3]' (or [gcs])"
        ) from None
    opts = check_options(options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fs, root = fsspec.core.url_to_fs(url, **opts)
    except ImportError as exc:
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'saverules[{extra}]'" if extra else f"install the fsspec backend of {protocol}://"
        raise CheckpointError(f"saverules: cannot open {url}: {exc} ({hint})") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"saverules: cannot open {url}: {exc}") from None
    return fs, str(root).rstrip("/")
