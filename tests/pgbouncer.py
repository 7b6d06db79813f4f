"""A real PgBouncer (Debian's package) in front of the test server, as production has it.

PgBouncer refuses to run as root: as root it runs as the user that may reach the server's
socket (the owner of the embedded server's socket directory, ``embedded_postgres``), or
as ``postgres`` for a server on TCP. Its configuration is PgBouncer's defaults except
where it listens, trust authentication and the pool mode: in particular no
``ignore_startup_parameters``, as in a stock installation.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flowfix.config import Settings, normalize_url


def binary() -> str | None:
    """The pgbouncer executable (Debian installs it in /usr/sbin, not always on PATH)."""
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )


SKIP_REASON = "PgBouncer is not installed (apt-get install -y pgbouncer; .ci/run installs it)"


@dataclass(frozen=True)
class Bouncer:
    port: int
    mode: str

    def settings(self, direct: Settings) -> Settings:
        """``direct``'s database, user, schema and URL parameters, reached through this
        PgBouncer."""
        url = direct.require_url()
        query = {k: v for k, v in url.query.items() if k not in ("host", "port")}
        through = url.set(host="127.0.0.1", port=self.port, query=query)
        return Settings(
            url=normalize_url(through),
            schema=direct.schema,
            lock_timeout=direct.lock_timeout,
            lock_retries=direct.lock_retries,
            create_tables=direct.create_tables,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_address(server_url: str) -> tuple[str, int, str | None]:
    """(host or socket directory, port, the OS user that may reach it) of the test server."""
    url = normalize_url(server_url)
    host = url.host or str(url.query.get("host") or "")
    port = url.port or int(str(url.query.get("port") or 5432))
    if host.startswith("/"):
        return host, port, pwd.getpwuid(os.stat(host).st_uid).pw_name
    return host or "127.0.0.1", port, "postgres"


@contextmanager
def pgbouncer(server_url: str, mode: str) -> Iterator[Bouncer]:
    """Start PgBouncer (``pool_mode = mode``) in front of the server of ``server_url``;
    every database name is passed through to the server. Its files live in a directory
    of its own under the system's temp dir (pytest's is private to root), removed after."""
    exe = binary()
    assert exe is not None, SKIP_REASON
    host, server_port, owner = _server_address(server_url)
    tmp = Path(tempfile.mkdtemp(prefix=f"flowfix-pgbouncer-{mode}-"))
    port = _free_port()
    (tmp / "users.txt").write_text('"postgres" ""\n')
    ini = tmp / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"* = host={host} port={server_port}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {tmp / 'users.txt'}\n"
        f"pool_mode = {mode}\n"
        f"logfile = {tmp / 'pgbouncer.log'}\n"
        f"pidfile = {tmp / 'pgbouncer.pid'}\n"
    )
    user = owner if os.geteuid() == 0 else None
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (tmp, *tmp.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    command = [exe, "-d", str(ini)]
    subprocess.run(
        ["runuser", "-u", user, "--", *command] if user else command, check=True, timeout=30, capture_output=True
    )
    pid_file = tmp / "pgbouncer.pid"
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().strip() or not _listening(port):
            assert time.monotonic() < deadline, (tmp / "pgbouncer.log").read_text()
            time.sleep(0.05)
        yield Bouncer(port, mode)
    finally:
        if pid_file.exists() and pid_file.read_text().strip():
            os.kill(int(pid_file.read_text()), 15)  # the PgBouncer started here, by its pid
            deadline = time.monotonic() + 10
            while pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(tmp, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
