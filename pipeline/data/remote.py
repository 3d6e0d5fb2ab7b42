"""Datasets in S3-compatible object storage: URLs, small-file reads and uploads, and access errors.

The shards themselves move with mosaicml-streaming: ``MDSWriter(out=(staging, remote))`` uploads them as
they are written, ``streaming.base.util.merge_index`` merges part indexes in the bucket, and
``Stream(remote=..., local=cache)`` downloads (and, with a cache limit, evicts) them during training.
This module only adds what the pipeline needs around that: reading and uploading the small files beside
the shards (``manifest.json``, ``mixture.yaml``, the done marker) and one clear error when the bucket
cannot be read.

The endpoint and the credentials come only from the environment, the variables boto3 and streaming read
(``S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ...): recipes and command lines hold bucket URLs only, so no secret can reach a log,
the metrics, the wandb config or a checkpoint.
"""
from __future__ import annotations

import os
import posixpath
import tempfile
import urllib.parse

CREDENTIALS_HINT = ("set S3_ENDPOINT_URL (S3-compatible servers), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "(or AWS_PROFILE) in the environment of every process")


class RemoteError(ValueError):
    """Object storage cannot be read or written (missing bucket, wrong credentials, unreachable endpoint)."""


def is_remote(path: str | os.PathLike | None) -> bool:
    """True for an object-storage URL such as ``s3://bucket/prefix`` (not for local paths or file://)."""
    return path is not None and urllib.parse.urlparse(str(path)).scheme not in ("", "file")


def join(base: str, *names: str) -> str:
    """``base/name/...`` for a URL or a local folder."""
    return posixpath.join(base, *names) if is_remote(base) else os.path.join(base, *names)


def _url_folder(root: str, url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    return os.path.join(root, parsed.scheme, parsed.netloc, *filter(None, parsed.path.split("/")))


def staging_folder(url: str) -> str:
    """The default local staging folder of an output URL: the same one on every run on this machine."""
    return _url_folder(os.path.join(tempfile.gettempdir(), "aki-staging"), url)


def cache_folder(url: str, root: str | None = None) -> str:
    """The local cache folder of a dataset URL under ``root`` (default: the temporary directory, which is
    per node on clusters), named after the URL so that two datasets never share a cache."""
    return _url_folder(root or os.path.join(tempfile.gettempdir(), "aki-stream-cache"), url)


# The variables a client depends on; one client per process and setting (creating one takes ~0.5 s).
_CLIENT_VARIABLES = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                     "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION")
_CLIENTS: dict[tuple, object] = {}


def _s3_client():
    import boto3

    key = (os.getpid(), *(os.environ.get(v) for v in _CLIENT_VARIABLES))
    if key not in _CLIENTS:
        _CLIENTS.clear()
        _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)
    return _CLIENTS[key]


def _split(url: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3":
        raise RemoteError(f"{url}: only s3:// URLs (AWS S3 or an S3-compatible server) are supported")
    return parsed.netloc, parsed.path.lstrip("/")


def _explain(url: str, err: Exception) -> RemoteError:
    """A RemoteError naming the URL, what went wrong and what to do (never the credentials)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket = urllib.parse.urlparse(url).netloc
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket",):
            return RemoteError(f"{url}: bucket {bucket!r} does not exist; create it or fix the URL")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                    "ExpiredToken"):
            return RemoteError(f"{url}: access denied ({code}): the credentials are wrong or may not read "
                               f"bucket {bucket!r}; {CREDENTIALS_HINT}")
        if code in ("NoSuchKey", "404"):
            return RemoteError(f"{url} does not exist (bucket {bucket!r} is readable): check the prefix")
        return RemoteError(f"{url}: object storage error {code}: {err.response.get('Error', {}).get('Message')}")
    if isinstance(err, NoCredentialsError):
        return RemoteError(f"{url}: no credentials found; {CREDENTIALS_HINT}")
    if isinstance(err, EndpointConnectionError):
        return RemoteError(f"{url}: cannot reach the object storage endpoint "
                           f"{os.environ.get('S3_ENDPOINT_URL') or '(AWS default)'}; check S3_ENDPOINT_URL")
    return RemoteError(f"{url}: {type(err).__name__}: {err}")


def check_bucket(url: str) -> None:
    """Raise :class:`RemoteError` unless the bucket of ``url`` exists and the credentials may use it."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = _split(url)
    try:
        _s3_client().head_bucket(Bucket=bucket)
    except ClientError as err:
        if str(err.response.get("Error", {}).get("Code")) == "404":     # head_bucket's code for a missing one
            raise RemoteError(f"{url}: bucket {bucket!r} does not exist; create it or fix the URL") from None
        raise _explain(url, err) from None
    except BotoCoreError as err:
        raise _explain(url, err) from None


def exists(url: str) -> bool:
    """True when the object ``url`` exists (a missing bucket or a denied access is an error)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(url)
    try:
        _s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
            check_bucket(url)
            return False
        raise _explain(url, err) from None
    except BotoCoreError as err:
        raise _explain(url, err) from None
    return True


def download(url: str, local_path: str) -> str:
    """Copy the object ``url`` to ``local_path`` (replaced atomically); returns ``local_path``."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(url)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    tmp = f"{local_path}.tmp{os.getpid()}"
    try:
        _s3_client().download_file(bucket, key, tmp)
    except ClientError as err:
        if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
            check_bucket(url)
        raise _explain(url, err) from None
    except BotoCoreError as err:
        raise _explain(url, err) from None
    os.replace(tmp, local_path)
    return local_path


def upload(local_path: str, url: str) -> None:
    """Copy the local file ``local_path`` to the object ``url``."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(url)
    try:
        _s3_client().upload_file(local_path, bucket, key)
    except (BotoCoreError, ClientError) as err:
        raise _explain(url, err) from None


def fetch(path: str, folder: str) -> str:
    """A local path holding the file ``path``: itself when local, else downloaded into ``folder``."""
    if not is_remote(path):
        return path
    return download(path, os.path.join(folder, posixpath.basename(urllib.parse.urlparse(path).path)))


__all__ = ["CREDENTIALS_HINT", "RemoteError", "cache_folder", "check_bucket", "download", "exists", "fetch",
           "is_remote", "join", "staging_folder", "upload"]
