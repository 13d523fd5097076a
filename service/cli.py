"""`nexus-data`: serve, migrate, seed, check-schema, keys, blobs, search, policy."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from db.errors import NexusError
from service.config import Config, ConfigError, log_setting_warnings, redacted_url


# Exit statuses: 0 done; 1 refused by the service, or a check that found something (check-schema,
# blobs sweep); 2 a setting, flag or argument that cannot work (the line names it); 3 the
# database did not answer within NEXUS_DB_WAIT_SECONDS (nothing wrong with the settings, maybe:
# the database may be down; starting again later may work).
EXIT_REFUSED = 1
EXIT_BAD_SETTING = 2
EXIT_DATABASE_UNREACHABLE = 3


def _config(args: argparse.Namespace) -> Config:
    overrides = {
        "database_url": getattr(args, "database_url", None),
        "port": getattr(args, "port", None),
        "host": getattr(args, "host", None),
        "workers": getattr(args, "workers", None),
        "metrics_port": getattr(args, "metrics_port", None),
    }
    if getattr(args, "no_migrate", False):
        overrides["migrate_on_start"] = False
    if getattr(args, "insecure_dev", False):
        overrides["insecure_dev"] = True
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        overrides[name] = getattr(args, name, None)
    config = Config.from_env(**overrides)
    args.config = config  # for the message of a failure (main)
    if args.command != "serve":  # serve logs them once its logging is set up
        log_setting_warnings(config)
    return config


def _serve(args: argparse.Namespace) -> int:
    from service.memory import limit_arenas
    from service.server import serve, serve_workers
    from service.telemetry import configure_logging

    config = _config(args)
    limit_arenas(config.malloc_arenas)  # before any thread starts (and for the workers it spawns)
    configure_logging(config.log_level, config.log_format)
    log_setting_warnings(config)
    if config.workers > 1:
        return serve_workers(config)
    asyncio.run(serve(config))
    return 0


def operator_problem(exc: BaseException, config: Config | None) -> tuple[str, int] | None:
    """(one line, exit status) for the failures an operator meets (a setting, the schema, the
    database, the port, a file named by a setting, a refused command); None for anything else,
    a bug, which keeps its traceback."""
    from sqlalchemy import exc as sa_exc

    from db.database import DatabaseUnreachable, first_line
    from db.migrate import SchemaMismatch

    setting = config.database_setting if config is not None else "DATABASE_URL"
    if isinstance(exc, ConfigError):
        return str(exc), EXIT_BAD_SETTING
    if isinstance(exc, DatabaseUnreachable):
        return (
            f"the database at {exc.where} did not answer within {exc.waited:g}s ({exc.detail}): start it, or correct "
            f"{setting}; NEXUS_DB_WAIT_SECONDS sets how long to wait for it",
            EXIT_DATABASE_UNREACHABLE,
        )
    if isinstance(exc, SchemaMismatch):
        return str(exc), EXIT_BAD_SETTING
    if isinstance(exc, NexusError):
        return f"{exc.message} ({exc.reason})", EXIT_REFUSED
    if isinstance(exc, (sa_exc.DBAPIError, sa_exc.ArgumentError, sa_exc.NoSuchModuleError)):
        where = redacted_url(config.database_url) if config is not None else ""
        return f"the database {where} cannot be used: {first_line(exc)} ({setting})", EXIT_BAD_SETTING
    if config is not None and isinstance(exc, RuntimeError) and "bind" in str(exc).lower():
        return f"cannot listen on {config.host}:{config.port}: is another server on that port? (NEXUS_HOST, NEXUS_PORT)", EXIT_BAD_SETTING
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror}: {exc.filename}", EXIT_BAD_SETTING
    return None


def _on_the_database(command: str, config: Config, work: Callable[[Any], int]) -> int:
    """work(database) for a command that needs the database, once it answers (PostgreSQL is
    waited for, NEXUS_DB_WAIT_SECONDS, as by serve)."""
    from service.server import open_database

    database = open_database(config)
    try:
        return work(database)
    finally:
        database.dispose()


def _migrate(args: argparse.Namespace) -> int:
    from db import migrate

    def work(database: Any) -> int:
        try:
            migrate.migrate_to(database.engine, args.revision)
        except migrate.UnknownRevision as exc:
            print(f"nexus-data migrate: {exc}", file=sys.stderr)
            return EXIT_BAD_SETTING
        print(f"schema at {migrate.current_revision(database.engine)}")
        return 0

    return _on_the_database("migrate", _config(args), work)


def _check(args: argparse.Namespace) -> int:
    from db import migrate
    from db.engine.search import missing_search_objects

    def work(database: Any) -> int:
        try:
            migrate.check(database.engine)
        except migrate.SchemaMismatch as exc:
            print(str(exc), file=sys.stderr)
            return 1
        # Made by migrations but declared on no model, so the revision alone cannot vouch for them.
        damaged = {spec.name: missing for spec in searchable_resources() if (missing := missing_search_objects(database.engine, spec.table.name))}
        for name, missing in damaged.items():
            print(f"{name}: search index incomplete, missing or unusable: {', '.join(missing)}", file=sys.stderr)
        if damaged:
            print("run `nexus-data search rebuild` to make the search indexes whole", file=sys.stderr)
            return 1
        print(f"schema at head {migrate.head_revision()}")
        return 0

    return _on_the_database("check-schema", _config(args), work)


def _operator() -> str:
    """The OS user running the command."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a name (containers)
        return f"uid {os.getuid()}"


@contextlib.contextmanager
def _audited(command: str, dialect: str) -> Iterator[str]:
    """The command's writes are audited as its own: actor "system", method "cli:<command> by
    <OS user>", one request id for the whole command (yielded, for the command to show)."""
    from db.engine.call import CURRENT_CALL, Call

    request_id = str(uuid.uuid4())
    token = CURRENT_CALL.set(Call(request_id=request_id, method=f"cli:{command} by {_operator()}"[:255], dialect=dialect))
    try:
        yield request_id
    finally:
        CURRENT_CALL.reset(token)


def _seed(args: argparse.Namespace) -> int:
    from db import migrate, seed
    from db.blobs import BlobStore
    from service.server import open_database

    config = _config(args)
    database = open_database(config)
    try:
        migrate.upgrade(database.engine)
        # Seeded keys' secrets are not kept: on an empty database the first admin key is made
        # and handed out here, as the first `serve` would have.
        from service.server import bootstrap_admin_key, hand_out_admin_key

        secret = bootstrap_admin_key(database, config)
        if secret:
            hand_out_admin_key(config, secret)
        with _audited("seed", database.dialect) as request_id:
            if not args.quiet:
                print(f"audited as request {request_id}", file=sys.stderr)
            counts = seed.seed(
                database,
                users=args.users,
                projects=args.projects,
                tasks_per_project=args.tasks,
                channels=args.channels,
                messages_per_channel=args.messages,
                conversations=args.conversations,
                messages_per_conversation=args.turns,
                knowledge_chunks=args.chunks,
                documents=args.documents,
                ai_interactions=args.ai_interactions,
                analyses=args.analyses,
                tool_generations=args.tool_generations,
                blobs=BlobStore(config.blob_path),
                progress=not args.quiet,
            )
        print(", ".join(f"{n} {name}" for name, n in counts.items()))
    finally:
        database.dispose()
    return 0


# keys create's flags by the field of the key they set (for the service's refusals).
_KEY_FLAGS = {"name": "--name", "role": "--role", "user_id": "--user-id", "expire_time": "--expires-in-days"}
MAX_KEY_DAYS = 36_500


def _key_name(raw: str) -> str:
    if not raw.strip():
        raise argparse.ArgumentTypeError("a key needs a name that is not blank")
    return raw


def _user_id(raw: str) -> str:
    try:
        uuid.UUID(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a user id (a UUID)") from None
    return raw


def _days(raw: str) -> int:
    if not raw.strip().isdigit() or not 1 <= int(raw) <= MAX_KEY_DAYS:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a number of days from 1 to {MAX_KEY_DAYS} (leave the flag out for a key that does not expire)"
        )
    return int(raw)


def _flag_of(exc: NexusError) -> str | None:
    """The keys create flag a refusal of the service is about."""
    for path in [violation.field for violation in exc.violations] + [exc.metadata.get("field", "")]:
        flag = _KEY_FLAGS.get(path.rpartition(".")[2])
        if flag:
            return flag
    if exc.resource_type == "User":
        return "--user-id"
    return "--name" if exc.reason == "RESOURCE_ALREADY_EXISTS" else None


def _keys_create(args: argparse.Namespace) -> int:
    import datetime as dt

    import db.domains  # noqa: F401 - the audit trail records the new key
    from db import migrate
    from db.domains.identity import create_api_key
    from service.server import open_database

    from db import secrets

    config = _config(args)
    secrets.configure(config.hash_time_cost, config.hash_memory_kib)
    database = open_database(config)
    try:
        migrate.check(database.engine)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=args.expires_in_days) if args.expires_in_days else None
        with _audited("keys create", database.dialect) as request_id:
            key, secret = database.run_sync(
                lambda s: create_api_key(s, args.name, args.role, args.user_id or "", expires, tuple(args.scope or ()))
            )
    except NexusError as exc:
        flag = _flag_of(exc)
        print(f"nexus-data keys create: {flag + ': ' if flag else ''}{exc.message} ({exc.reason})", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        database.dispose()
    print(f"API key {key.name!r} ({key.id}, role {args.role}; audited as request {request_id}). The secret is shown once:", file=sys.stderr)
    print(secret)
    return 0


def policy_table() -> list[dict[str, str]]:
    """Every resource x role: the rows it sees and manages, in words, from the resources'
    declarations (ResourceSpec.access, db/engine/rules.py)."""
    import db.domains  # noqa: F401 - every resource in the registry
    from db.engine.resource import REGISTRY
    from db.engine.rules import ROLES, describe

    table = []
    for spec in sorted(REGISTRY, key=lambda s: s.name):
        for role in ROLES:
            sees, manages = describe(spec, role)
            table.append({"resource": spec.name, "role": role, "sees": sees, "manages": manages})
    return table


def _policy(args: argparse.Namespace) -> int:
    import json

    from service import policy
    from service.server import DOMAIN_SERVICES

    table = policy_table()
    names = [f"{full_name}/{method.name}" for cls, _, full_name in DOMAIN_SERVICES for method in cls.service_descriptor.methods]
    catalog = policy.permission_catalog(names)
    permissions = {name: policy.permission_for(name) for name in names}
    if args.json:
        print(json.dumps({
            "rows": table,
            "least_role_by_method": {name: policy.action_for(name).value for name in names},
            "permission_by_method": permissions,
            "built_in_roles_by_permission": {p: policy.built_in_holders(p, catalog) for p in sorted(catalog)},
            "key_scope_by_method": policy.SCOPED_METHODS,
        }, indent=2))
        return 0
    widths = {key: max(len(key), *(len(row[key]) for row in table)) for key in ("resource", "role", "sees")}
    print(f"{'RESOURCE':<{widths['resource']}}  {'ROLE':<{widths['role']}}  {'SEES':<{widths['sees']}}  MANAGES")
    for row in table:
        print(f"{row['resource']:<{widths['resource']}}  {row['role']:<{widths['role']}}  {row['sees']:<{widths['sees']}}  {row['manages']}")
    print()
    method_width = max(len("METHOD"), *map(len, names))
    permission_width = max(len("PERMISSION"), *map(len, catalog))
    print(f"{'METHOD':<{method_width}}  {'PERMISSION':<{permission_width}}  BUILT-IN ROLES")
    for name in names:
        print(f"{name:<{method_width}}  {permissions[name]:<{permission_width}}  {','.join(policy.built_in_holders(permissions[name], catalog))}")
    print()
    print("Which role may call which RPC at all: a method needs its permission; the built-in roles hold")
    print("those of their level (guests read, users and above write, some need admin). A custom Role holds")
    print("the permissions it was given; a user with Roles assigned may call what one of them holds and its level allows.")
    opened = "; ".join(f"{scope} opens {method}" for method, scope in policy.SCOPED_METHODS.items())
    print(f"Which methods an API key's scopes open, whatever the key's role: {opened}.")
    return 0


def _blobs_sweep(args: argparse.Namespace) -> int:
    """Blobs no file names and stale temporary files removed (or only listed), and files whose
    blob is missing or of another size listed; exit 1 when there is any, 2 when the blob store is
    not a directory."""
    from sqlalchemy.orm import Session

    from db.blobs import BlobStore
    from db.domains import files

    config = _config(args)
    if not os.path.isdir(config.blob_path):
        print(f"blobs sweep: the blob store {config.blob_path} is not a directory: set NEXUS_BLOB_DIR to the servers' store", file=sys.stderr)
        return 2

    def work(database: Any) -> int:
        with Session(database.engine) as session:
            found = files.sweep(session, BlobStore(config.blob_path), args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for sha256 in found.unreferenced:
            print(f"{verb} unreferenced blob {sha256}")
        for temp in found.temps:
            print(f"{verb} stale temporary file {temp}")
        for file_id, sha256 in found.missing:
            print(f"missing blob {sha256} of file {file_id}")
        for file_id, sha256, blob_size, file_size in found.damaged:
            print(f"damaged blob {sha256} of file {file_id}: {blob_size} bytes, the file has {file_size}")
        print(f"{len(found.unreferenced)} unreferenced blobs, {len(found.temps)} stale temporary files, "
              f"{len(found.missing)} files without their blob, {len(found.damaged)} with a damaged one ({config.blob_path})")
        return 1 if found.missing or found.damaged else 0

    return _on_the_database("blobs sweep", config, work)


def searchable_resources() -> list[Any]:
    """Every resource with full-text search (its ResourceSpec), by name."""
    import db.domains  # noqa: F401 - every resource in the registry
    from db.engine.resource import REGISTRY

    return sorted((spec for spec in REGISTRY if spec.searchable), key=lambda spec: spec.name)


def _search_rebuild(args: argparse.Namespace) -> int:
    """The search index of every searchable resource (or of --resource) built afresh from its
    table; one line per resource with its rows, then the totals."""
    from db import migrate
    from db.engine.search import rebuild_index

    specs = searchable_resources()
    if args.resource:
        wanted = args.resource.strip().lower()
        specs = [spec for spec in specs if wanted in (spec.name.lower(), spec.plural.lower(), spec.table.name.lower())]
        if not specs:
            names = ", ".join(spec.name for spec in searchable_resources())
            print(f"nexus-data search rebuild: --resource: {args.resource!r} is not a searchable resource (one of: {names})", file=sys.stderr)
            return EXIT_BAD_SETTING

    def work(database: Any) -> int:
        migrate.check(database.engine)
        total = 0
        for spec in specs:
            done = rebuild_index(database.engine, spec.table.name, spec.search_fields)
            total += done.rows
            print(f"{spec.name}: {done.rows} rows indexed ({done.index} {done.action})", flush=True)
        print(f"search index rebuilt for {len(specs)} resource{'s' if len(specs) != 1 else ''}, {total} rows")
        return 0

    return _on_the_database("search rebuild", _config(args), work)


def _usage_rebuild(args: argparse.Namespace) -> int:
    """ai_usage_days (the AI usage summary's daily sums) made afresh from the interactions."""
    from db import migrate
    from db.domains.ai_usage import rebuild_usage_days

    def work(database: Any) -> int:
        migrate.check(database.engine)
        with database.engine.begin() as conn:
            rows = rebuild_usage_days(conn)
        print(f"AI usage daily sums rebuilt: {rows} rows")
        return 0

    return _on_the_database("usage rebuild", _config(args), work)


class _Parser(argparse.ArgumentParser):
    """A wrong flag or argument is one line (which, and where the help is), exit status 2, not
    the usage text with the error at its end."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_SETTING, f"{self.prog}: {message} (see {self.prog} --help)\n")


DEBUG_HELP = "on a failure, show its traceback too (by default: one line saying what to change)"


def build_parser() -> argparse.ArgumentParser:
    from service import __version__

    parser = _Parser(prog="nexus-data", description="Nexus Data Service")
    parser.add_argument("--version", action="version", version=f"nexus-data {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="SQLAlchemy URL; default from DATABASE_URL / DB_* / DB_PATH / NEXUS_DATA_DIR")

    serve = sub.add_parser("serve", help="run the gRPC server")
    common(serve)
    serve.add_argument("--host", help="bind address (NEXUS_HOST, default [::])")
    serve.add_argument("--port", type=int, help="port (NEXUS_PORT, default 50051)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on http://host:PORT/metrics (NEXUS_METRICS_PORT, default 0: off)")
    serve.add_argument("--no-migrate", action="store_true", help="refuse to start unless the schema is at head")
    serve.add_argument("--workers", type=int, help="server processes sharing the port (NEXUS_WORKERS, default 1)")
    serve.add_argument("--insecure-dev", action="store_true", help="turn authentication OFF (local experiments only)")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (NEXUS_TLS_CERT)")
    serve.add_argument("--tls-key", help="PEM private key of --tls-cert (NEXUS_TLS_KEY)")
    serve.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mTLS)")
    serve.set_defaults(func=_serve)

    mig = sub.add_parser("migrate", help="upgrade the schema to head, or move it to a revision, up or down")
    common(mig)
    mig.add_argument("revision", nargs="?", default="head")
    mig.set_defaults(func=_migrate)

    chk = sub.add_parser("check-schema", help="exit 1 unless the schema is at head")
    common(chk)
    chk.set_defaults(func=_check)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create an API key and print its secret once")
    common(create)
    create.add_argument("--name", required=True, type=_key_name)
    create.add_argument("--role", required=True, choices=["admin", "manager", "user", "guest"])
    create.add_argument("--user-id", type=_user_id, help="the user the key acts for (its id, a UUID)")
    create.add_argument("--expires-in-days", type=_days, help=f"days until the key stops working (1 to {MAX_KEY_DAYS}; default: never)")
    from db.domains.identity import KEY_SCOPES

    create.add_argument(
        "--scope", action="append", choices=sorted(KEY_SCOPES),
        help="what the key may do beyond its role (repeatable; a key without --user-id): identity.users.ensure lets it call EnsureUser",
    )
    create.set_defaults(func=_keys_create)

    blobs = sub.add_parser("blobs", help="the blob store of files (NEXUS_BLOB_DIR)")
    blobs_sub = blobs.add_subparsers(dest="blobs_command", required=True)
    sweep = blobs_sub.add_parser(
        "sweep", help="remove blobs no file names and temporary files older than an hour; list files whose blob is missing"
    )
    common(sweep)
    sweep.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    sweep.set_defaults(func=_blobs_sweep)

    search = sub.add_parser("search", help="the full-text search indexes")
    search_sub = search.add_subparsers(dest="search_command", required=True)
    rebuild = search_sub.add_parser(
        "rebuild", help="build the search index of every searchable resource afresh from its rows (after a VACUUM, a restore, a damaged index)"
    )
    common(rebuild)
    rebuild.add_argument("--resource", help="only this resource (its name, e.g. Task, or its table, e.g. tasks)")
    rebuild.set_defaults(func=_search_rebuild)

    usage = sub.add_parser("usage", help="the AI usage summary's daily sums")
    usage_sub = usage.add_subparsers(dest="usage_command", required=True)
    usage_rebuild = usage_sub.add_parser(
        "rebuild", help="make the daily sums of AI interactions afresh from their rows (after SQL that went around their triggers, a restore of one table)"
    )
    common(usage_rebuild)
    usage_rebuild.set_defaults(func=_usage_rebuild)

    seed = sub.add_parser("seed", help="fill the database with realistic sample data")
    common(seed)
    seed.add_argument("--users", type=int, default=50)
    seed.add_argument("--projects", type=int, default=20)
    seed.add_argument("--tasks", type=int, default=25, help="tasks per project")
    seed.add_argument("--channels", type=int, default=10)
    seed.add_argument("--messages", type=int, default=30, help="chat messages per channel")
    seed.add_argument("--conversations", type=int, default=20)
    seed.add_argument("--turns", type=int, default=8, help="messages per conversation")
    seed.add_argument("--chunks", type=int, default=150, help="knowledge chunks")
    seed.add_argument("--documents", type=int, default=20, help="documents, with their versions and shares")
    seed.add_argument("--ai-interactions", type=int, default=200, help="AI interactions (calls to models) of the last 30 days")
    seed.add_argument("--analyses", type=int, default=12, help="data analyses, in every status, with their files")
    seed.add_argument("--tool-generations", type=int, default=12, help="tool generations, in every status")
    seed.add_argument("--quiet", action="store_true", help="no progress bar")
    seed.set_defaults(func=_seed)

    policy = sub.add_parser("policy", help="print which rows each role sees and manages, for every resource")
    policy.add_argument("--json", action="store_true", help="as JSON, with the least role and the permission of every served method")
    policy.set_defaults(func=_policy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # --debug after the command too (`nexus-data serve --debug`); SUPPRESS: absent there, it
    # leaves the one before the command as it is.
    for choice in _subparsers(parser):
        choice.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser, which names it and its --help
        prog = " ".join(["nexus-data", *_command_words(args)])
        next((p for p in _subparsers(parser) if p.prog == prog), parser).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # noqa: BLE001 - an operator's mistake is one line; anything else keeps its traceback
        found = operator_problem(exc, getattr(args, "config", None))
        if found is None:
            raise
        line, status = found
        if args.debug:
            traceback.print_exc()
        start = args.command == "serve" or isinstance(exc, ConfigError)
        config = getattr(args, "config", None)
        if args.command == "serve" and config is not None and config.log_format == "json":  # every line on stderr JSON
            logging.getLogger("nexus").critical("refusing to start: %s", line)
        else:
            print(f"{'nexus-data: refusing to start' if start else ' '.join(['nexus-data', *_command_words(args)])}: {line}", file=sys.stderr)
        return status


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every (sub)command's parser, recursively."""
    for action in parser._actions:  # noqa: SLF001 - argparse lists its subparsers nowhere else
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for choice in dict.fromkeys(action.choices.values()):
                yield choice
                yield from _subparsers(choice)


def _command_words(args: argparse.Namespace) -> list[str]:
    subcommands = (getattr(args, name, None) for name in ("keys_command", "blobs_command", "search_command"))
    return [word for word in (args.command, *subcommands) if word]


if __name__ == "__main__":
    raise SystemExit(main())
