"""A private PostgreSQL per test session, and a fresh migrated database per use.

PostgreSQL must be installed (`make test` bootstraps the Debian package): when it is not,
every test that needs it fails with that reason; none is skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from cloud_trainer.storage.config import DatabaseSection
from cloud_trainer.storage.launcher import PostgresError, PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """initdb + postgres in a temp folder on a free loopback port, stopped by its PID."""
    try:
        server = PostgresServer(durable=False).start()
    except PostgresError as exc:
        pytest.fail(f"PostgreSQL is needed for this test and could not start: {exc}",
                    pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_database(postgres: PostgresServer) -> Iterator[Callable[..., DatabaseSection]]:
    """``pg_database(name="main", migrate=True)``: a fresh database, as trainer.toml's
    ``[database]`` names it; the same name in one test returns the same database."""
    from cloud_trainer.storage import migrate
    from cloud_trainer.storage.engine import make_engine

    made: dict[str, DatabaseSection] = {}

    def make(name: str = "main", migrated: bool = True) -> DatabaseSection:
        if name not in made:
            db_name = f"t_{uuid.uuid4().hex[:12]}_{name}"
            url = postgres.create_database(db_name)
            section = DatabaseSection(url=url, password_file=postgres.password_file)
            if migrated:
                engine = make_engine(section)
                migrate.upgrade(engine)
                engine.dispose()
            made[name] = section
        return made[name]

    yield make
    for section in made.values():
        assert section.url is not None
        postgres.drop_database(section.url.rsplit("/", 1)[1])
