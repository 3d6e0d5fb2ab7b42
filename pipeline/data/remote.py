"""Datasets in S3-compatible object storage: URLs, small-file reads and uploads, and access errors.

The shards themselves move with mosaicml-streaming: ``MDSWriter(out=(staging, remote))`` uploads them as
they are written, ``streaming.base.util.merge_index`` merges part indexes in the bucket, and
``Stream(remote=..., local=cache)`` downloads (and, with a cache limit, evicts) them during training.
This module only adds what the pipeline needs around that: reading and uploading the small files beside
the shards (``manifest.json``, ``mixture.yaml``, the done marker), one clear error when the bucket
cannot be read, and outages that end:

* every download (:func:`download`, and the shards and indexes streamed through
  :mod:`pipeline.data.downloads`) retries *transient* errors only (:func:`is_transient`: unreachable
  endpoint, dropped connection, timeout, 5xx) after waits doubling from 1 s, ``data.download_retry``
  attempts in all (:func:`with_retries`); a missing object or a denied access fails at once;
* a download that still fails ends the process with one line naming the object, the endpoint and the
  error (:func:`exit_on_storage_error`, status :data:`EXIT_STORAGE`) instead of a hang.

The endpoint and the credentials come only from the environment, the variables boto3 and streaming read
(``S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ...): recipes and command lines hold bucket URLs only, so no secret can reach a log,
the metrics, the wandb config or a checkpoint.
"""
from __future__ import annotations

import os
import posixpath
import random
import tempfile
import time
import urllib.parse
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")

EXIT_STORAGE = 75                   # EX_TEMPFAIL: the storage could not be read; a later attempt may succeed
DEFAULT_DOWNLOAD_RETRY = 9          # attempts: waits of 1 + 2 + ... + 128 = 255 s, an outage of ~4 minutes
DEFAULT_DOWNLOAD_TIMEOUT = 60.0     # seconds one attempt may wait for the storage (connect, read)
_RETRY = {"attempts": DEFAULT_DOWNLOAD_RETRY, "timeout": DEFAULT_DOWNLOAD_TIMEOUT}
# ClientError codes of a storage that is overloaded or failing for a moment (the request may be repeated).
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "Throttling", "ThrottlingException", "RequestTimeTooSkewed"}

CREDENTIALS_HINT = ("set S3_ENDPOINT_URL (S3-compatible servers), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "(or AWS_PROFILE) in the environment of every process")


class RemoteError(ValueError):
    """Object storage cannot be read or written (missing bucket, wrong credentials, unreachable endpoint)."""


class StorageUnavailable(RemoteError):
    """Transient storage errors went on past the last attempt of ``data.download_retry``."""


def configure_retries(attempts: int, timeout: float) -> None:
    """Set the attempts and the per-attempt timeout of this process's downloads (``data.download_retry``,
    ``data.download_timeout``); streams get theirs from the StreamingDataset's arguments."""
    _RETRY.update(attempts=int(attempts), timeout=float(timeout))


def endpoint() -> str:
    """The storage endpoint this process talks to (no credentials in it)."""
    return os.environ.get("S3_ENDPOINT_URL") or "AWS S3 (default endpoint)"


def is_transient(err: BaseException) -> bool:
    """True for an error that repeating the request may cure: the endpoint unreachable, a connection
    dropped or timed out, a 5xx / throttling answer. Not for a missing object or a denied access."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return str(error.get("Code", "")) in _TRANSIENT_CODES or int(status) >= 500
    return isinstance(err, (ConnectionError, HTTPClientError, IncompleteReadError, TimeoutError, ConnectionResetError,
                            ConnectionRefusedError, ConnectionAbortedError))


def retry_window(attempts: int, timeout: float) -> float:
    """The longest :func:`with_retries` can take: every attempt timing out, and the waits between them."""
    return attempts * timeout + sum(2 ** i + 0.5 for i in range(attempts - 1))


def with_retries(action: Callable[[], T], url: str, attempts: int | None = None) -> T:
    """``action()``, repeated after waits of 1, 2, 4, ... s (plus up to 0.5 s of jitter, as streaming's
    own retry) while it fails with a transient error; :class:`StorageUnavailable` naming ``url``, the
    endpoint and the last error after ``attempts`` (default ``data.download_retry``) failures. Other errors
    are raised at once."""
    attempts = attempts or _RETRY["attempts"]
    started = time.monotonic()
    for attempt in range(attempts):
        try:
            return action()
        except Exception as err:  # noqa: BLE001  (classified below; anything not transient is raised as is)
            if not is_transient(err):
                raise
            if attempt + 1 == attempts:
                raise StorageUnavailable(
                    f"{url}: object storage at {endpoint()} failed {attempts} attempt(s) over "
                    f"{time.monotonic() - started:.0f} s (data.download_retry): {type(err).__name__}: "
                    f"{_one_line(err)}") from None
            time.sleep(2 ** attempt + random.random() * 0.5)
    raise AssertionError("unreachable")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def describe(err: BaseException, url: str | None = None) -> str:
    """One line for a failed download: the object, the endpoint and what went wrong."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(err, RemoteError):
        return _one_line(err)
    if isinstance(err, ClientError) and str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
        listed = "" if (url or "").endswith("index.json") else " (listed in the dataset's index.json)"
        return (f"{url or 'an object'} is missing from the object storage at {endpoint()}{listed}: restore it or "
                "write the dataset again with data_prep")
    if isinstance(err, (BotoCoreError, ClientError)) and url is not None:
        return f"{_one_line(_explain(url, err))} (endpoint {endpoint()})"
    return f"{url + ': ' if url else ''}{type(err).__name__}: {_one_line(err)}"


def exit_on_storage_error(message: str, status: int = EXIT_STORAGE) -> NoReturn:
    """Print ``error: [rank R] message`` as one line and end this process now with ``status``
    (:func:`pipeline.watchdog.exit_now`; the launcher then stops the other ranks). The checkpoint of the
    last save is complete: ``--resume auto`` continues from it."""
    from pipeline.watchdog import exit_now

    exit_now(f"{message}; this process exits with status {status} (the run continues from its last checkpoint "
             "with --resume auto)", status)


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
    from botocore.config import Config

    key = (os.getpid(), _RETRY["timeout"], *(os.environ.get(v) for v in _CLIENT_VARIABLES))
    if key not in _CLIENTS:
        _CLIENTS.clear()
        config = Config(connect_timeout=_RETRY["timeout"], read_timeout=_RETRY["timeout"])
        _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
                                                       config=config)
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
    """Copy the object ``url`` to ``local_path`` (replaced atomically); returns ``local_path``. Transient
    errors are retried (:func:`with_retries`); past the last attempt: :class:`StorageUnavailable`."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split(url)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    tmp = f"{local_path}.tmp{os.getpid()}"
    try:
        with_retries(lambda: _s3_client().download_file(bucket, key, tmp), url)
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


__all__ = ["CREDENTIALS_HINT", "DEFAULT_DOWNLOAD_RETRY", "DEFAULT_DOWNLOAD_TIMEOUT", "EXIT_STORAGE", "RemoteError",
           "StorageUnavailable", "cache_folder", "check_bucket", "configure_retries",
           "describe", "download", "endpoint", "exists", "exit_on_storage_error", "fetch", "is_remote", "is_transient",
           "join", "retry_window", "staging_folder", "upload", "with_retries"]
