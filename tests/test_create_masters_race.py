"""The application creates the master of a discovery flow at the same moment as
``backfill --create-missing-masters`` does (a trigger plays the application: it inserts
the same flow_id just before flowfix's row lands). flowfix's INSERT takes the
application's master instead of failing on the unique flow_id (ON CONFLICT DO NOTHING):
one master, the flow linked to it, and the created-masters ledger names none."""

from __future__ import annotations

import uuid

from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings
from tests.conftest import upgrade
from tests.helpers import add_discovery_flow, cli_env, script, sql

runner = CliRunner()

APPLICATION_RACES = (
    """CREATE FUNCTION app_races() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.flow_configuration->>'created_by' = 'flowfix backfill'
     AND NOT EXISTS (SELECT 1 FROM crewai_flow_state_extensions WHERE flow_id = NEW.flow_id) THEN
    INSERT INTO crewai_flow_state_extensions SELECT (jsonb_populate_record(NULL::crewai_flow_state_extensions,
      to_jsonb(NEW) || jsonb_build_object('id', gen_random_uuid(),
                                          'flow_configuration', '{"created_by": "the application"}'::jsonb))).*;
  END IF;
  RETURN NEW;
END $$""",
    """CREATE TRIGGER app_races BEFORE INSERT ON crewai_flow_state_extensions
FOR EACH ROW EXECUTE FUNCTION app_races()""",
)


def test_a_master_the_application_creates_meanwhile_is_taken_not_a_failure(settings: Settings) -> None:
    upgrade(settings, "fix_master_flow_fk")
    flow = uuid.uuid4()
    add_discovery_flow(settings, flow_id=flow, master=None, client=uuid.uuid4(), engagement=uuid.uuid4())
    script(settings, *APPLICATION_RACES)
    result = runner.invoke(app, ["backfill", "--create-missing-masters"], env=cli_env(settings))
    assert result.exit_code == Exit.OK, result.output
    masters = sql(
        settings,
        "SELECT flow_configuration->>'created_by' AS by FROM crewai_flow_state_extensions WHERE flow_id = :f",
        {"f": flow},
    )
    assert [m["by"] for m in masters] == ["the application"]
    assert sql(settings, "SELECT master_flow_id FROM discovery_flows WHERE flow_id = :f", {"f": flow}) == [
        {"master_flow_id": flow}
    ]
    created = sql(
        settings, "SELECT count(*) AS n FROM flowfix_changes WHERE table_name = 'crewai_flow_state_extensions'"
    )
    assert created == [{"n": 0}]
