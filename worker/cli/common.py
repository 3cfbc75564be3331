"""What every CLI command shares: settings from the callback, error → exit code, JSON output."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.text import Text

from config.settings import Settings
from schemas.events import escape_bytes, normalize_sku
from worker.errors import ConfigError, ServiceUnavailable, TransientError

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURES",
    "EXIT_USAGE",
    "EXIT_UNREACHABLE",
    "State",
    "console",
    "err_console",
    "emit_json",
    "handle_errors",
    "milvus_session",
    "ensure_schema",
    "plain",
]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# emoji off: ":abc:" in a model spec, a path or a SKU is text, not an emoji code
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)
log = logging.getLogger("imgsync")

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """Per-invocation state set by the CLI callback."""

    settings: Settings | None = None
    debug: bool = False


def settings_from(ctx: typer.Context) -> Settings:
    state: State = ctx.obj
    if state.settings is None:
        try:
            settings = Settings()
        except ValidationError as exc:
            raise ConfigError(_settings_error(exc)) from exc
        from worker.encoders.spec import parse_spec

        parse_spec(settings.model)  # a malformed IMGSYNC_MODEL is a usage error for every command
        state.settings = settings
    return state.settings


#: words in a setting's name that mark its value as a secret, never shown back
_SECRET_WORDS = ("token", "secret", "password", "key")


def _settings_error(exc: ValidationError) -> str:
    """One line per invalid setting: its variable, what is wrong, and the value given (passwords in
    URLs and secret settings hidden; nothing when the check spans several settings)."""
    from worker.errors import hide_passwords

    parts = []
    for err in exc.errors():
        loc = "_".join(str(p) for p in err["loc"]).upper()
        if not loc:  # a check across settings: its message names them
            parts.append(str(err["msg"]).removeprefix("Value error, "))
            continue
        name = loc if loc.startswith("IMGSYNC_") else f"IMGSYNC_{loc}"  # a .env key keeps its own name
        given = err.get("input")
        if err["type"] == "extra_forbidden":
            shown = " (not a setting of imgsync)"
        elif any(w in loc.lower() for w in _SECRET_WORDS):
            shown = ""
        elif isinstance(given, (str, int, float, bool)):
            shown = f" (got {hide_passwords(repr(given))})"
        else:
            shown = ""
        parts.append(f"{name}: {str(err['msg']).removeprefix('Value error, ')}{shown}")
    return "invalid settings: " + "; ".join(parts)


def handle_errors(fn: F) -> F:
    """Expected errors become one line on stderr and an exit code; ``--debug`` shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.get("ctx") or (args[0] if args and isinstance(args[0], typer.Context) else None)
        debug = bool(ctx and ctx.obj and ctx.obj.debug)
        as_json = bool(kwargs.get("json_out"))
        _emitted.clear()
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            _fail(exc, EXIT_USAGE, debug, as_json)
        except ServiceUnavailable as exc:
            _fail(_with_disk_hint(exc, _settings_of(ctx)), EXIT_UNREACHABLE, debug, as_json)
        except TransientError as exc:
            _fail(_milvus_failing(exc, _settings_of(ctx)), EXIT_UNREACHABLE, debug, as_json)
        except Exception as exc:  # noqa: BLE001 - only a service's or the disk's faults are expected here
            settings = _settings_of(ctx)
            unreachable = _broker_unreachable(exc) or _store_failing(exc, settings)
            if unreachable is None:
                raise
            _fail(_with_disk_hint(unreachable, settings), EXIT_UNREACHABLE, debug, as_json)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _broker_unreachable(exc: Exception) -> ServiceUnavailable | None:
    """A publish that failed because the broker cannot be reached (kombu raises OperationalError once
    its connection retries are spent), as ServiceUnavailable naming IMGSYNC_BROKER_URL; else None."""
    from kombu.exceptions import OperationalError as BrokerError

    if not isinstance(exc, BrokerError):
        return None
    from worker.celery_app import app
    from worker.ledger.db import safe_url

    return ServiceUnavailable("broker", "IMGSYNC_BROKER_URL", safe_url(str(app.conf.broker_url or "")), str(exc))


def sku_option(value: str | None) -> str | None:
    """A ``--sku`` value as SKUs are stored (trimmed); None when not given.

    Raises:
        ConfigError: given but empty, or with control characters (it was ignored: a filter of all).
    """
    if value is None:
        return None
    try:
        return normalize_sku(value)  # the rule ImageEvent applies
    except ValueError as exc:
        raise ConfigError(f"--sku {value!r}: {exc}") from exc


def check_broker(settings: Settings) -> None:
    """Connect to a broker of its own once (the embedded one is a file: nothing to check).

    Raises:
        ServiceUnavailable: it does not answer within seconds (Celery would retry for ever).
    """
    if settings.embedded_broker:
        return
    from kombu import Connection
    from kombu.exceptions import OperationalError as BrokerError

    from worker.ledger.db import safe_url

    try:
        with Connection(settings.effective_broker_url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except (BrokerError, OSError) as exc:
        raise ServiceUnavailable("broker", "IMGSYNC_BROKER_URL", safe_url(settings.effective_broker_url), str(exc)) from exc


def _settings_of(ctx: typer.Context | None) -> Settings | None:
    """The invocation's settings (read by the command, else read now); None when they do not parse
    (that was reported before any service was used)."""
    if ctx is not None and isinstance(ctx.obj, State) and ctx.obj.settings is not None:
        return ctx.obj.settings
    try:
        return Settings()
    except Exception:  # noqa: BLE001
        return None


def _store_failing(exc: Exception, settings: Settings | None) -> ServiceUnavailable | None:
    """A state database that failed mid-command (connection lost, "database or disk is full") or a
    write refused for lack of space, as ServiceUnavailable naming what failed; else None."""
    import errno
    import sqlite3

    from sqlalchemy.exc import OperationalError as DatabaseError

    from worker.ledger.db import safe_url

    if isinstance(exc, (DatabaseError, sqlite3.OperationalError)):  # sqlite3's own: raised by BEGIN IMMEDIATE
        orig = getattr(exc, "orig", None)
        cause = str(orig if orig is not None else exc).splitlines()[0]
        if "locked" in cause:
            cause += " (another process held its write lock for 30 s)"
        url = safe_url(settings.effective_database_url) if settings is not None else "the state database"
        return ServiceUnavailable("database", "IMGSYNC_DATABASE_URL", url, cause, state="failing")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = str(exc.filename or "a file")
        home = Path(settings.home).expanduser().absolute() if settings is not None else None
        # a file elsewhere is on another disk, maybe
        setting = "IMGSYNC_HOME" if home is not None and Path(where).absolute().is_relative_to(home) else ""
        return ServiceUnavailable("disk", setting, where, "no space left on device", state="full")
    return None


def _with_disk_hint(exc: ServiceUnavailable, settings: Settings | None) -> ServiceUnavailable:
    """``exc``, its message followed by the free-space line when IMGSYNC_HOME's disk is (nearly) full."""
    from worker.status import disk_problem

    disk = disk_problem(settings) if settings is not None else None
    if disk is None or disk in str(exc):
        return exc
    return ServiceUnavailable(exc.service, exc.setting, exc.target, f"{exc.cause}; {disk}", state=exc.state)


def _milvus_failing(exc: TransientError, settings: Settings | None) -> TransientError:
    """A Milvus call that failed mid-command (the server went away after answering, a timeout) named
    as the service it is, with its setting, like one that could not be reached at all."""
    from schemas.reasons import Reason
    from worker.index.milvus_store import CollectionMissing

    if exc.reason != Reason.index_unavailable:
        return exc
    target = (settings.milvus_uri if settings is not None else "") or "the embedded Milvus Lite server"
    cause = str(exc).removeprefix("Milvus ")
    if isinstance(exc, CollectionMissing):  # it answered, but lost a collection: what makes it again
        cause += "; `imgsync verify --repair` (or `verify --model M --repair` for another version) makes it again"
    return ServiceUnavailable("Milvus", "IMGSYNC_MILVUS_URI", target, cause, state="failing")


def _fail(exc: Exception, code: int, debug: bool, as_json: bool) -> None:
    if debug:
        err_console.print_exception()
    message = escape_bytes(str(exc))  # a file name that is not UTF-8 prints, and fits JSON
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    if as_json and not _emitted:  # stdout still owes its one document: the error is that document
        from schemas.outputs import ErrorInfo, ErrorOutput

        emit_json(
            ErrorOutput(
                error=ErrorInfo(
                    kind="usage" if code == EXIT_USAGE else "unreachable",
                    exit_status=code,
                    message=message,
                    service=getattr(exc, "service", None) or None,
                    setting=getattr(exc, "setting", None) or None,
                )
            )
        )
    raise typer.Exit(code)


def plain(value: object) -> Text:
    """A table cell shown as is: user data (uris, SKUs, messages) is never read as rich markup."""
    return Text("" if value is None else str(value))


#: non-empty once this invocation has written its JSON document (an error after it adds no second one)
_emitted: list[bool] = []


def emit_json(doc: BaseModel | dict[str, Any]) -> None:
    """One JSON document on stdout, nothing else there."""
    _emitted.append(True)
    if isinstance(doc, BaseModel):
        text = doc.model_dump_json()
    else:
        text = json.dumps(doc, default=str)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def ensure_schema(settings: Settings) -> None:
    """Embedded mode upgrades its own SQLite state; a production database must be upgraded on purpose
    (``imgsync db upgrade``) and is only checked here."""
    import sqlalchemy as sa

    from worker.ledger.db import current_revision, head_revision, known_revisions, safe_url, unknown_revision_message, upgrade

    if not settings.database_url:
        upgrade(settings.effective_database_url)
        return
    try:
        rev = current_revision(settings.effective_database_url)
    except sa.exc.ProgrammingError as exc:  # reachable, but this role may not read imgsync's tables
        raise ConfigError(
            f"the state database at {safe_url(settings.effective_database_url)} (IMGSYNC_DATABASE_URL) refused to show "
            f"its schema revision: {str(exc.orig).strip()} — grant this role use of imgsync's schema and tables"
        ) from exc
    except Exception as exc:  # noqa: BLE001
        raise ServiceUnavailable("database", "IMGSYNC_DATABASE_URL", settings.effective_database_url, str(exc)) from exc
    if rev is None:
        raise ConfigError("the state database has no schema yet: run `imgsync db upgrade` (IMGSYNC_DATABASE_URL)")
    if rev not in known_revisions():
        raise ConfigError(unknown_revision_message(rev, settings.effective_database_url))
    if rev != head_revision():
        raise ConfigError(
            f"the state database is at schema revision {rev}, this imgsync needs {head_revision()}: "
            "run `imgsync db upgrade` (IMGSYNC_DATABASE_URL)"
        )


@contextmanager
def milvus_session(settings: Settings) -> Iterator[str]:
    """A Milvus URI for the duration of a command: the configured one, the running embedded server,
    or a temporary embedded server started (and flushed and stopped) just for this command."""
    from worker.index import LiteServer, MilvusStore, running_server_uri

    if settings.milvus_uri:
        yield settings.milvus_uri
        return
    uri = running_server_uri(settings.milvus_data_dir)
    if uri:
        yield uri
        return
    server = LiteServer(settings.milvus_data_dir)
    server.start()
    try:
        yield server.uri
    finally:
        store = MilvusStore(server.uri)
        try:
            store.flush()
        except Exception:  # noqa: BLE001 - best effort before stopping
            log.debug("flush before stop failed", exc_info=True)
        finally:
            store.close()
            server.stop()
