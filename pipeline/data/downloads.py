"""Downloads of the training streams that retry blips and end outages, instead of hanging the job.

mosaicml-streaming 0.13 downloads shards in background threads of each reading process. When a download
fails (its own ``download_retry`` attempts exhausted, ~2 s by default), the thread dies with the shard
left in its "being downloaded" state and without ending the epoch: the process then waits for ever in
the iterator's ``exit()`` or for that shard, and every other rank in its next collective. No collective
timeout ends that. Here:

* :class:`RetryingStream` downloads a shard or an ``index.json`` with
  :func:`pipeline.data.remote.with_retries`: transient errors retried after doubling waits for
  ``data.download_retry`` attempts (each of at most ``data.download_timeout`` seconds), a missing object
  or a denied access not retried; a failure is one :class:`~pipeline.data.remote.RemoteError` line naming
  the object and the endpoint; the other ranks of the node wait for their leader's ``index.json`` for
  that whole window (streaming would give them one attempt's ``download_timeout``);
* :class:`FailFastDownloads` (mixed into the StreamingDataset) turns a failure in a background thread
  into that line on stderr and the end of the process (:func:`pipeline.data.remote.exit_on_storage_error`,
  status 75); the launcher then stops the other ranks, and ``--resume auto`` continues from the last
  checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

from streaming import Stream

from pipeline.data.remote import EXIT_STORAGE, RemoteError, describe, exit_on_storage_error, retry_window, with_retries


class RetryingStream(Stream):
    """A streaming ``Stream`` whose downloads retry transient errors only (:func:`with_retries` with this
    stream's ``download_retry`` and ``download_timeout``) and fail with one line naming the object."""

    def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
        # the paths as streaming's Stream._download_file computes them
        remote = None if self.remote is None else os.path.join(self.remote, self.split, from_basename)
        local = os.path.join(self.local, self.split, to_basename or from_basename)

        def attempt() -> None:
            try:
                self._downloader.download(remote, local, self.download_timeout)
            except Exception:
                self._downloader.clean_up()
                raise

        try:
            with_retries(attempt, remote or local, self.download_retry)
        except Exception as err:  # noqa: BLE001  (every failure becomes one line naming the object)
            raise RemoteError(describe(err, remote or local)) from None
        return local

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list:
        if world.is_local_leader:
            return super().get_shards(world, allow_unsafe_types)
        # streaming waits ``download_timeout`` for the leader's index.json: give it the leader's whole window
        per_attempt = self.download_timeout
        self.download_timeout = retry_window(self.download_retry, per_attempt)
        try:
            return super().get_shards(world, allow_unsafe_types)
        finally:
            self.download_timeout = per_attempt


class FailFastDownloads:
    """StreamingDataset mixin: an exception in streaming's download or ready thread (streaming's
    ``on_exception`` callback) ends the process with one line instead of leaving it and its peers waiting."""

    def on_exception(self, future: Any) -> None:
        err = future.exception()
        if err is not None:    # status 75 for storage (a later run may succeed), 1 for anything else
            exit_on_storage_error(describe(err), EXIT_STORAGE if isinstance(err, (RemoteError, OSError)) else 1)


__all__ = ["FailFastDownloads", "RetryingStream"]
