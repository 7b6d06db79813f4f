"""pytest-alembic's standard checks, driven through its ``alembic_runner`` fixture
against a real PostgreSQL (its ``--test-alembic`` collector does not load on pytest 9)."""

from pytest_alembic.tests import (  # noqa: F401 - collected as tests
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
