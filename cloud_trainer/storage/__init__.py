"""Where the trainer's state lives when it outgrows one machine: PostgreSQL.

``config`` is the ``[database]`` section (a URL without its password, the secret from a file
or a systemd credential); ``engine`` turns it into SQLAlchemy engines and psycopg conninfo;
``migrate`` holds the Alembic schema and the start-up version check; ``leader`` elects the
one scheduler among replicas with an advisory lock; ``launcher`` runs a private PostgreSQL
for tests and benches.

The sample stores are ingest's: the ``SampleStore`` on PostgreSQL is
``cloud_trainer/ingest/postgres.py``; the embedded default (SQLite files in the state
directory), ``cloud_trainer/ingest/store.py``, needs none of this.
"""
