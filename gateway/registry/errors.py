"""Database errors translated into the store's own: the rest of the gateway never sees
SQLAlchemy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from gateway.store import DuplicateError, StoreError

__all__ = ["translated"]

# SQLite: "UNIQUE constraint failed"; PostgreSQL: "duplicate key value violates unique constraint".
_UNIQUE_WORDS = ("unique", "duplicate key")

# What SQLite and PostgreSQL say, and what an operator should understand from it.
_HINTS = (
    ("readonly", "the database is read-only"),
    ("read-only", "the database is read-only"),
    ("disk is full", "the disk is full"),
    ("no space left", "the disk is full"),
    ("locked", "the database is locked by another writer"),
    ("unable to open", "the database file cannot be opened"),
    ("disk i/o error", "the disk reported an I/O error"),
    ("not a database", "the file is not a registry database"),
    ("could not connect", "the database server cannot be reached"),
    ("connection refused", "the database server cannot be reached"),
)


def _cause(error: DBAPIError) -> str:
    original = error.orig if error.orig is not None else error
    text = str(original).strip()
    return text.splitlines()[0] if text else type(original).__name__


def _explain(error: DBAPIError) -> str:
    cause = _cause(error)
    lowered = cause.lower()
    for needle, hint in _HINTS:
        if needle in lowered:
            return f"{hint} ({cause})"
    return cause


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Run a registry operation; a broken uniqueness rule becomes DuplicateError, another broken
    constraint ValueError, and any other database failure StoreError, each naming what was being
    done."""
    try:
        yield
    except IntegrityError as error:
        cause = _cause(error)
        if any(word in cause.lower() for word in _UNIQUE_WORDS):
            raise DuplicateError(f"{action}: already exists ({cause})") from error
        # NOT NULL, foreign key or check failures: the record itself was unacceptable.
        raise ValueError(f"{action}: rejected by the database ({cause})") from error
    except (OperationalError, DBAPIError) as error:
        raise StoreError(f"{action} failed: {_explain(error)}") from error
    except PoolTimeoutError as error:
        raise StoreError(f"{action} failed: no database connection free ({error})") from error
