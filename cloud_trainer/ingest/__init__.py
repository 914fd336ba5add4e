"""Broker to sample store (SQLite or PostgreSQL) and the fleet table: what training reads."""
