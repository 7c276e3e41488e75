"""Errors as the one-line reasons that go into the `error` column and onto stderr.

`user_error` turns the exceptions a user's input causes (a missing file, S3 without
credentials, a bucket that does not exist) into one line that names the fix, so the CLI can
print it instead of a traceback. `redact` keeps secrets (user-info, pre-signed query
strings) out of every URI that is printed or recorded.
"""

from __future__ import annotations

import errno
from typing import Any
from urllib.parse import urlsplit, urlunsplit

S3_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
          "or pass --s3-anon for a public bucket")


def one_line(e: BaseException) -> str:
    """`Type: first line of the message`, at most 500 characters."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def user_error(e: BaseException) -> str | None:
    """One line naming the fix when `e` comes from bad input (storage access, local paths);
    None for anything else (a bug, a failed run), which deserves its traceback."""
    storage = storage_error(e)
    if storage:
        return storage
    if isinstance(e, OSError) and e.errno in _PATH_ERRORS and e.filename:
        return f"{_PATH_ERRORS[e.errno]}: {e.filename}"
    return None


_PATH_ERRORS = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EEXIST: "already exists",
    errno.ENOTDIR: "not a folder (a file is in the way)",
    errno.EISDIR: "is a folder, expected a file",
}


def storage_error(e: BaseException) -> str | None:
    """One line naming the fix for an object-storage failure (s3fs / botocore / aiohttp),
    found anywhere in `e`'s chain of causes; None if there is none.

    s3fs re-raises botocore's ClientError as PermissionError / FileNotFoundError with the
    ClientError as __cause__, so the S3 error code is read from the chain.
    """
    for cause in _chain(e):
        name = type(cause).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return f"no S3 credentials found: {S3_FIX}"
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"):
            return (f"cannot reach the S3 endpoint {_endpoint(cause)}: check --s3-endpoint-url "
                    "(or AWS_ENDPOINT_URL_S3) and the network")
        code = _s3_code(cause)
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return (f"S3 rejected the credentials ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "(or AWS_PROFILE), or pass --s3-anon for a public bucket")
        if code in ("AccessDenied", "403", "AllAccessDisabled", "AccountProblem"):
            return ("S3 access denied: the credentials in use (AWS_ACCESS_KEY_ID / AWS_PROFILE) lack "
                    "permission here; use credentials that have it, or --s3-anon for a public bucket")
        if code == "NoSuchBucket":
            return "no such S3 bucket: check the bucket name (and --s3-endpoint-url for S3-compatible stores)"
    return None


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _s3_code(e: BaseException) -> str | None:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code") or "") or None
    return None


def _endpoint(e: BaseException) -> str:
    """scheme://host:port of the URL botocore could not connect to (its path says nothing)."""
    url = (getattr(e, "kwargs", None) or {}).get("endpoint_url") or ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else "(unknown)"


_SECRET_QUERY = "[redacted]"


def redact(uri: str | None) -> str | None:
    """A URI without secrets: user-info and query strings (pre-signed URLs carry their
    signature and credentials there) are removed. Other text passes unchanged."""
    if not uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = _SECRET_QUERY if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_tree(value: Any) -> Any:
    """redact() every URI-looking string inside a JSON-like value (a config dump)."""
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v) for v in value]
    return redact(value) if isinstance(value, str) else value
