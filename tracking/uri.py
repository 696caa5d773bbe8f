"""Checks of an MLflow tracking URI before any run: the scheme is one this project can
record into, its database driver is installed, and its store answers and takes writes.

Each check returns the problems it found as sentences that name the URI and the fix (an
empty list when all is well), so that a preflight can report every problem at once. Only
the standard library and SQLAlchemy are imported (MLflow's own import takes ~2.5 s).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from runtime.errors import TrackingError

#: SQLAlchemy dialects MLflow's database store supports (``mlflow.store.db.db_types``).
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
HTTP_SCHEMES = ("http", "https")
DEFAULT_HINT = "unset --tracking-uri/MLFLOW_TRACKING_URI to use the embedded SQLite store"
#: MLflow's HTTP client retries a failed request 7 times, backing off from 2 s and doubling,
#: and waits up to 120 s for each answer: a tracking server that died held a run for about
#: 25 minutes, and a read command for 4. These bound one call at about 5 s against a
#: refused connection and about a minute against a server that never answers. Each is a
#: default: the same variable set in the environment wins.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def bound_http_retries() -> None:
    """Set ``HTTP_RETRIES`` as defaults of this process (and the processes it starts),
    before MLflow's client makes its first request."""
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)


def uri_scheme(uri: str) -> str:
    """The URI's scheme without a SQLAlchemy driver (``postgresql+psycopg2`` -> ``postgresql``);
    ``''`` for a bare path."""
    return urlsplit(uri).scheme.split("+")[0].lower() if "://" in uri or ":" in uri[:12] else ""


def check_scheme(uri: str) -> list[str]:
    """A scheme MLflow can record this project's runs and registered models into."""
    scheme = uri_scheme(uri)
    if scheme in DATABASE_SCHEMES + HTTP_SCHEMES:
        return []
    if scheme in ("", "file"):
        return [f"tracking URI {uri!r} is a file store, which MLflow keeps in maintenance mode "
                "and which cannot hold this project's registered models: use a database, e.g. "
                "--tracking-uri sqlite:///mlruns/mlflow.db (`mlflow migrate-filestore` moves "
                f"an existing store), or {DEFAULT_HINT}"]
    return [f"tracking URI {uri!r} has the unknown scheme {scheme!r}: use sqlite:///PATH, "
            "postgresql://USER@HOST/DB, mysql://..., mssql://... or http(s)://HOST:PORT of an "
            f"MLflow server, or {DEFAULT_HINT}"]


def check_driver(uri: str) -> list[str]:
    """A database URI's Python driver (DB-API module) is importable."""
    if uri_scheme(uri) not in DATABASE_SCHEMES:
        return []
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(uri).get_dialect()
        dialect.import_dbapi()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        return [f"tracking URI {uri!r} is not a valid database URL ({exc}): write it as "
                "DIALECT[+DRIVER]://USER@HOST[:PORT]/DATABASE"]
    except ImportError as exc:
        return [f"tracking URI {uri!r} needs the database driver {exc.name or exc!s}, which "
                f"is not installed: install it (for PostgreSQL: pip install psycopg2-binary), "
                f"or name an installed driver in the URL, or {DEFAULT_HINT}"]
    return []


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (None for in-memory or other schemes)."""
    if uri_scheme(uri) != "sqlite" or not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def writable_dir_problem(path: Path, what: str, fix: str) -> str | None:
    """Whether a file can be created in ``path`` (created if absent); a sentence if not.

    Args:
        path: The folder.
        what: How to name it in the message, e.g. "LAYERWISE_HOME".
        fix: What to do instead, e.g. "set LAYERWISE_HOME to a writable folder".
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".layerwise-write-check-"):
            pass
    except OSError as exc:
        return f"{what} {path} is not writable ({exc.strerror or exc}): {fix}"
    return None


def check_reachable_and_writable(uri: str, timeout: float = 5.0) -> list[str]:
    """The store answers: a SQLite file's folder takes writes, a database server accepts a
    connection, an MLflow server answers ``/health``."""
    scheme = uri_scheme(uri)
    db = sqlite_path(uri)
    if db is not None:
        problem = writable_dir_problem(db.parent, "the folder of the SQLite store",
                                       f"give --tracking-uri sqlite:///WRITABLE/mlflow.db "
                                       f"or set LAYERWISE_HOME to a writable folder")
        if problem is None and db.exists() and not os.access(db, os.W_OK):
            problem = f"the SQLite store {db} is read-only: make it writable or use another file"
        return [problem] if problem else []
    if scheme in DATABASE_SCHEMES:
        return _check_database(uri, timeout)
    if scheme in HTTP_SCHEMES:
        try:
            check_reachable(uri.rstrip("/") + "/health", "the MLflow tracking server",
                            f"Start it, or {DEFAULT_HINT}.", timeout=timeout)
        except TrackingError as exc:
            return [str(exc)]
    return []


def _check_database(uri: str, timeout: float) -> list[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    args = {"connect_timeout": int(timeout)} if uri_scheme(uri) in ("postgresql", "mysql") else {}
    engine = create_engine(uri, connect_args=args)
    try:
        with contextlib.closing(engine.connect()) as con:
            con.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        return [f"the MLflow database at {uri!r} does not accept connections ({reason}): "
                f"start it and check the URL, or {DEFAULT_HINT}"]
    finally:
        engine.dispose()
    return []


def check_tracking_uri(uri: str) -> list[str]:
    """Every problem with ``uri``: scheme, then driver, then reachability and writes (each
    later check only when the earlier ones passed)."""
    for check in (check_scheme, check_driver, check_reachable_and_writable):
        problems = check(uri)
        if problems:
            return problems
    return []


def check_reachable(url: str, what: str, hint: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when an HTTP server does not answer its health URL."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
            if response.status >= 500:
                raise OSError(f"HTTP {response.status}")
    except (OSError, urllib.error.URLError) as exc:
        raise TrackingError(f"{what} at {url} is unreachable ({exc}). {hint}") from exc


def preflight_mlflow(uri: str) -> None:
    """The tracking URI can be used (``tracking.uri.check_tracking_uri``): a known
    scheme, its driver installed, the store reachable and writable."""
    problems = check_tracking_uri(uri)
    if problems:
        raise TrackingError(" ".join(problems))
