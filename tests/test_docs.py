"""The documentation is part of the product: every relative link resolves, every option
of every command is documented, and the README's rollback block, run as written, takes
the database back from head and from fix_master_flow_fk."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import typer
from typer.core import TyperCommand, TyperGroup
from typer.testing import CliRunner

from flowfix.alembic_runner import head
from flowfix.cli import app
from flowfix.config import Settings
from tests.conftest import ROOT
from tests.helpers import add_discovery_flow, add_import, add_master, add_record, cli_env, links, revision
from tests.snapshot import take

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    found = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            broken.append(rel)
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == []


def commands() -> dict[str, TyperCommand | TyperGroup]:
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    return {"": group, **group.commands}


def test_every_option_of_every_command_is_documented() -> None:
    text = "\n".join(p.read_text() for p in [README, *DOCS])
    missing = []
    for name, command in commands().items():
        if name and f"flowfix {name}" not in text:
            missing.append(f"flowfix {name}")
        for param in command.params:
            if param.param_type_name == "option":
                for opt in param.opts + param.secondary_opts:
                    if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text):
                        missing.append(f"{name or 'flowfix'} {opt}")
    assert missing == []


@pytest.mark.parametrize("name", list(commands()))
def test_every_command_answers_h_with_its_choices_and_an_example(name: str) -> None:
    result = CliRunner().invoke(app, [*([name] if name else []), "-h"])
    assert result.exit_code == 0 and "-h, --help" in result.stdout
    if name:
        assert f"Example:\n\n    flowfix {name}" in result.stdout
    if name == "validate":
        assert "--format <text|json|junit|openmetrics>" in result.stdout
        assert "--fail-on <error|warn>" in result.stdout
    if name == "backfill":
        assert "--format <text|json>" in result.stdout


def rollback_block() -> str:
    text = README.read_text()
    block = text.split("<!-- rollback -->", 1)[1].split("<!-- /rollback -->", 1)[0]
    return block.strip().removeprefix("```sh").removesuffix("```").strip()


@pytest.mark.sampled_shapes
@pytest.mark.parametrize("start", ["head", "fix_master_flow_fk"])
def test_the_readmes_rollback_block_as_written_takes_the_database_back(shaped: Settings, start: str) -> None:
    s = shaped
    client, engagement = uuid.uuid4(), uuid.uuid4()
    _, flow = add_master(s, client=client, engagement=engagement)
    imp = add_import(s, master=None, client=client, engagement=engagement)
    add_discovery_flow(s, flow_id=flow, master=None, client=client, engagement=engagement, data_import=imp)
    for n in range(3):
        add_record(s, data_import=imp, master=None, row=n)
    before = take(s)

    runner = CliRunner()
    steps = [["upgrade", "fix_master_flow_fk"], ["backfill", "--window", "2h"], ["upgrade", "head"]]
    for step in steps if start == "head" else steps[:2]:
        done = runner.invoke(app, step, env=cli_env(s))
        assert done.exit_code == 0, done.output
        if step[0] == "backfill":
            run_id = done.stdout.split("backfill run ", 1)[1].split()[0]
    assert links(s, "data_imports") == {imp: flow}
    assert revision(s) == {"head": head()}.get(start, start)

    bin_dir = str(Path(sys.executable).parent)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", rollback_block()],
        env={**os.environ, **cli_env(s), "RUN": run_id, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert revision(s) == "legacy"
    after = take(s)
    assert after == before
