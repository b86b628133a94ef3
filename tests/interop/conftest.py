"""Start the real `natter` binary for each test.

The `server` fixture picks free loopback ports, writes a config TOML into the
test's tmp dir, runs `natter serve --config FILE` (binary from $NATTER_BIN or
target/debug/natter), waits until every listener accepts, and at teardown
sends SIGTERM and requires exit status 0 within 10 s (graceful shutdown).
Server stderr/stdout go to a log file that is attached to any failing test's
report.

Extra config for one test: @pytest.mark.natter_config({"registration": {"enabled": False}})

Store: env NATTER_TEST_STORE=postgres gives each server a fresh PostgreSQL
database `natter_test_<random>` on the server NATTER_TEST_PG_URL names
(default postgres://postgres@127.0.0.1:5432/postgres), created and dropped
with psql; unreachable, the test fails (never passes on SQLite instead).

Blob storage: a test that takes the `blob_storage` fixture runs twice, on
the local disk and on S3 (a moto server on loopback, `moto[server]` from
requirements.txt, one per session; a fresh bucket per test). Without moto
the S3 run fails, naming the cause.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[2]
PG_SERVER_URL = os.environ.get("NATTER_TEST_PG_URL",
                               "postgres://postgres@127.0.0.1:5432/postgres")
SHUTDOWN_GRACE_SECS = 10
STARTUP_SECS = 30
LOG_TAIL_BYTES = 200_000

_server_log_key = pytest.StashKey[Path]()

# slixmpp logs every stanza at DEBUG (captured, shown for failing tests);
# cut the 64 KiB ones so a failure report stays readable.
LOG_RECORD_LIMIT = 3000
_record_factory = logging.getLogRecordFactory()


def _short_records(*args, **kwargs):
    record = _record_factory(*args, **kwargs)
    try:
        msg = record.getMessage()
    except Exception:  # noqa: BLE001 - leave odd records alone
        return record
    if len(msg) > LOG_RECORD_LIMIT:
        record.msg = f"{msg[:LOG_RECORD_LIMIT]} ... [{len(msg)} chars]"
        record.args = ()
    return record


logging.setLogRecordFactory(_short_records)


def natter_bin() -> Path:
    env = os.environ.get("NATTER_BIN")
    return Path(env) if env else REPO / "target" / "debug" / "natter"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: dict, prefix: str = "") -> str:
    """Tables nest: {"components": {"bot.localhost": {"secret": …}}} becomes
    [components."bot.localhost"]."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            key = k if k.replace("_", "").isalnum() else _toml_value(k)
            name = f"{prefix}.{key}" if prefix else key
            lines.append(f"\n[{name}]")
            lines.append(to_toml(v, name).rstrip("\n"))
    return "\n".join(lines) + "\n"


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_store() -> str:
    store = os.environ.get("NATTER_TEST_STORE") or "sqlite"
    if store not in ("sqlite", "postgres"):
        pytest.fail(f"NATTER_TEST_STORE must be sqlite or postgres, not {store!r}", pytrace=False)
    return store


def _psql(sql: str) -> None:
    try:
        res = subprocess.run(["psql", PG_SERVER_URL, "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
                             capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.fail("NATTER_TEST_STORE=postgres needs psql on PATH", pytrace=False)
    if res.returncode != 0:
        pytest.fail(f"psql {PG_SERVER_URL} -c {sql!r} failed (NATTER_TEST_PG_URL): "
                    f"{res.stderr.strip()}", pytrace=False)


def pg_database_url(name: str) -> str:
    """PG_SERVER_URL naming database `name` instead."""
    base, sep, params = PG_SERVER_URL.partition("?")
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{name}{sep}{params}"


class NatterServer:
    host = "127.0.0.1"
    domain = "localhost"

    def __init__(self, workdir: Path, extra_config: dict | None = None):
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.config_path = workdir / "natter.toml"
        self.log_path = workdir / "natter.log"
        self.c2s_port, self.c2s_tls_port, self.http_port = free_ports(3)
        self.config = merge({
            "domains": [self.domain],
            "data_dir": str(self.data_dir),
            "listen": {
                "c2s": f"{self.host}:{self.c2s_port}",
                "c2s_tls": f"{self.host}:{self.c2s_tls_port}",
                "http": f"{self.host}:{self.http_port}",
            },
            "registration": {"enabled": True},
        }, extra_config or {})
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._log = None
        # Its own PostgreSQL database, for the server's whole life (restarts
        # included), dropped by drop_database().
        self.pg_database: str | None = None
        if test_store() == "postgres" and "store" not in (extra_config or {}):
            self.pg_database = f"natter_test_{secrets.token_hex(8)}"
            _psql(f'CREATE DATABASE "{self.pg_database}"')
            self.config = merge(self.config, {"store": {
                "backend": "postgres", "url": pg_database_url(self.pg_database)}})

    def drop_database(self) -> None:
        if self.pg_database is not None:
            _psql(f'DROP DATABASE IF EXISTS "{self.pg_database}" WITH (FORCE)')
            self.pg_database = None

    @property
    def ports(self) -> dict[str, int]:
        return {"c2s": self.c2s_port, "c2s_tls": self.c2s_tls_port, "http": self.http_port}

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.http_port}/xmpp-websocket"

    def env(self) -> dict:
        env = dict(os.environ)
        env.setdefault("RUST_LOG", os.environ.get("NATTER_TEST_LOG", "info,natter=debug"))
        env.setdefault("RUST_BACKTRACE", "1")
        return env

    def start(self) -> None:
        binary = natter_bin()
        if not binary.exists():
            pytest.fail(f"natter binary not found at {binary}: run `cargo build -p natter` "
                        f"(or set NATTER_BIN)", pytrace=False)
        self.config_path.write_text(to_toml(self.config))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.workdir, env=self.env())
        deadline = time.monotonic() + STARTUP_SECS
        pending = dict(self.ports)
        while pending:
            if self.proc.poll() is not None:
                pytest.fail(f"natter serve exited with {self.proc.returncode} during start-up\n"
                            f"{self.log_tail()}", pytrace=False)
            for name, port in list(pending.items()):
                try:
                    socket.create_connection((self.host, port), timeout=0.5).close()
                    del pending[name]
                except OSError:
                    pass
            if pending and time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"natter did not accept on {pending} within {STARTUP_SECS}s\n"
                            f"{self.log_tail()}", pytrace=False)
            if pending:
                time.sleep(0.05)

    def stop(self, grace: float = SHUTDOWN_GRACE_SECS) -> int | None:
        """SIGTERM, then wait up to `grace` s. Returns the exit status, or None
        if the server had to be killed."""
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
                self.returncode = None
                self._close_log()
                self.proc = None
                return None
        self.returncode = self.proc.returncode
        self.proc = None
        self._close_log()
        return self.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def crash(self) -> int | None:
        """kill -9 the server (no shutdown, no flush); start() brings it back
        on the same data dir and ports. Returns the exit status (-9)."""
        if self.proc is None:
            return self.returncode
        self.kill()
        self.returncode = self.proc.returncode
        self.proc = None
        self._close_log()
        return self.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self) -> str:
        return read_tail(self.log_path)

    def cli(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        """Run `natter ARGS... --config FILE`."""
        cmd = [str(natter_bin()), *args, "--config", str(self.config_path)]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True,
                             timeout=timeout, cwd=self.workdir, env=self.env())
        if check and res.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` exited {res.returncode}\nstdout:\n{res.stdout}\n"
                        f"stderr:\n{res.stderr}", pytrace=False)
        return res

    def add_user(self, jid: str, password: str) -> None:
        self.cli("user", "add", jid, password)


def read_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"(no server log: {exc})"
    if len(data) > limit:
        data = b"[... cut ...]\n" + data[-limit:]
    return data.decode("utf-8", "replace")


MOTO = os.environ.get("NATTER_TEST_MOTO", str(REPO / ".venv" / "bin" / "moto_server"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback for this session."""
    if not Path(MOTO).exists():
        pytest.fail(f"the S3 tests need moto_server ({MOTO}): pip install 'moto[server]' "
                    "into .venv (scripts/test-all does)", pytrace=False)
    port = free_ports(1)[0]
    proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + STARTUP_SECS
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on port {port}", pytrace=False)
            time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(params=["disk", "s3"])
def blob_storage(request):
    """Extra config putting uploads on the disk or in a fresh S3 bucket."""
    if request.param == "disk":
        return {}
    import urllib.request
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"natter-{secrets.token_hex(6)}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"))
    return {"upload": {"storage": "s3", "s3": {
        "endpoint": endpoint, "bucket": bucket, "allow_http": True,
        "access_key_id": "test", "secret_access_key": "test"}}}


def stored_blobs(server) -> list[str]:
    """The hashes of the blobs a server's upload service holds, disk or S3."""
    upload = server.config.get("upload", {})
    if upload.get("storage") == "s3":
        import boto3
        s3 = upload["s3"]
        client = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"])
        names = [o["Key"].rsplit("/", 1)[-1] for p in pages for o in p.get("Contents", [])]
    else:
        names = [f.name for f in (server.data_dir / "blobs").rglob("*") if f.is_file()]
    return sorted(n for n in names if len(n) == 64)


@pytest.fixture
def server(request, tmp_path):
    marker = request.node.get_closest_marker("natter_config")
    extra = marker.args[0] if marker else {}
    if "blob_storage" in request.fixturenames:
        extra = merge(extra, request.getfixturevalue("blob_storage"))
    srv = NatterServer(tmp_path, extra)
    request.node.stash[_server_log_key] = srv.log_path
    try:
        srv.start()
    except BaseException:
        srv.kill()
        srv.drop_database()
        raise
    try:
        yield srv
    finally:
        try:
            if srv.proc is None:
                pass  # the test stopped the server itself and checked the status
            elif srv.proc.poll() is not None:
                rc = srv.stop()
                pytest.fail(f"natter exited by itself (status {rc}) during the test", pytrace=False)
            else:
                rc = srv.stop()
                if rc != 0:
                    what = (f"was killed: still running {SHUTDOWN_GRACE_SECS}s after SIGTERM"
                            if rc is None else f"exited with status {rc} after SIGTERM")
                    pytest.fail(f"natter did not shut down gracefully: it {what}", pytrace=False)
        finally:
            srv.drop_database()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        path = item.stash.get(_server_log_key, None)
        if path is not None:
            rep.sections.append((f"natter server log ({path})", read_tail(path)))


def pytest_configure(config):
    config.addinivalue_line("markers", "natter_config(dict): extra natter config for this test")
