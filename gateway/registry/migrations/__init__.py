"""Alembic migrations of the registry (a package so it ships inside the wheel)."""
