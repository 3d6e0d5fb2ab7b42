"""An S3-compatible server for the tests: moto's standalone server on 127.0.0.1 that checks credentials.

moto (``moto[server]``, from the ``test`` extra) serves the S3 API over HTTP like any S3-compatible store.
The server starts with authentication enabled after the three IAM calls that create a user, its access
key and an allow-all S3 policy; every later request must be signed with that key, so a wrong secret gets
a real 403. The bucket :data:`BUCKET` is created with the key.

:class:`Relay` stands between a client and the server and simulates outages of the endpoint without
losing the server's objects and credentials (moto keeps them in memory: a restarted server would have
neither): ``down("refuse")`` closes its port (connection refused, what a stopped server gives),
``down("reset")`` accepts connections and resets them at once (counting them), ``up()`` relays again.
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

BUCKET = "aki-ci"
REGION = "us-east-1"
_SETUP_CALLS = 3            # create_user, create_access_key, put_user_policy: then requests must be signed


@dataclasses.dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen
    bucket: str = BUCKET

    def env(self, secret_key: str | None = None) -> dict[str, str]:
        """The standard variables that point boto3 and streaming at this server."""
        return {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key, "AWS_DEFAULT_REGION": REGION}

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=REGION)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server(timeout: float = 60) -> S3Server:
    """Start moto_server on a free loopback port, create credentials and the bucket."""
    import boto3

    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    assert os.path.exists(exe), f"{exe} not found: install the test extras (pip install -e '.[test]': moto[server])"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_CALLS)})
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on 127.0.0.1:{port} (exit {proc.poll()})")
            time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                       region_name=REGION)
    iam.create_user(UserName="aki-ci")
    key = iam.create_access_key(UserName="aki-ci")["AccessKey"]
    iam.put_user_policy(UserName="aki-ci", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    server = S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], proc)
    server.client().create_bucket(Bucket=BUCKET)
    return server


class Relay:
    """A TCP relay on a free loopback port to ``target`` (``host:port``) whose outages the tests switch.

    Clients use :attr:`endpoint`; :meth:`down` cuts the relayed connections and then refuses new ones
    (``"refuse"``) or accepts and resets them (``"reset"``, counted in :attr:`resets`); :meth:`up` ends
    the outage on the same port.
    """

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host.split("//")[-1], int(port))
        self.port = _free_port()
        self.mode = "up"
        self.resets = 0
        self._links: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listener: socket.socket | None = self._listen()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        return listener

    def down(self, how: str = "refuse") -> None:
        """Start an outage: ``"refuse"`` (the port closed) or ``"reset"`` (connections reset on arrival)."""
        assert how in ("refuse", "reset"), how
        with self._lock:
            self.mode = how
            if how == "refuse" and self._listener is not None:
                self._listener.close()
                self._listener = None
            for link in list(self._links):       # their relay threads close them (never closed under a
                _cut(link)                           # thread blocked on them: the number could be reused)
            self._links.clear()

    def up(self) -> None:
        """End the outage: relay again on the same port."""
        with self._lock:
            if self._listener is None:
                self._listener = self._listen()
            self.mode = "up"

    def close(self) -> None:
        self.down("refuse")
        self._closed = True

    def _accept_loop(self) -> None:
        while not self._closed:
            listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                ready, _, _ = select.select([listener], [], [], 0.1)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):          # closed by down("refuse") meanwhile
                continue
            with self._lock:
                if self.mode != "up":
                    self.resets += 1
                    _reset(client)
                    continue
                try:
                    server = socket.create_connection(self.target)
                except OSError:
                    _reset(client)
                    continue
                self._links.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):                  # wakes the other direction's thread, which closes dst
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._links.discard(src)
            src.close()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed server's connections end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def _cut(sock: socket.socket) -> None:
    """End a relayed connection now (a reset when its thread closes it), without closing it here."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
