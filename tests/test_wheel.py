"""`pip install` of a real wheel (not editable), in a fresh virtualenv outside the checkout,
gives a `flowfix` that runs the revisions: alembic/ travels inside the wheel."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
from pathlib import Path

from flowfix import alembic_runner
from flowfix.config import Settings
from tests.conftest import ROOT
from tests.helpers import plain_url, revision


def test_the_wheel_carries_the_revisions_and_runs_them(settings: Settings, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    (wheel,) = dist.glob("flowfix-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True
    )
    # the dependencies come from this environment's site-packages, added as a plain path
    # (its .pth files, among them the editable install of the checkout, are not processed)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "flowfix-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import flowfix; print(flowfix.__file__)"],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(env_dir)), where
    env = {"DATABASE_URL": plain_url(settings), "FLOWFIX_SCHEMA": "public", "PATH": "/usr/bin:/bin"}
    flowfix = str(env_dir / "bin" / "flowfix")
    version = subprocess.run([flowfix, "--version"], cwd=work, env=env, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("flowfix 0."), version.stderr
    done = subprocess.run(
        [flowfix, "upgrade", "head", "--create-tables"], cwd=work, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert revision(settings) == alembic_runner.head()
