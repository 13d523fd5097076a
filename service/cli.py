"""`nexus-data`: serve, migrate, seed, check-schema."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from service.config import Config


def _config(args: argparse.Namespace) -> Config:
    overrides = {
        "database_url": getattr(args, "database_url", None),
        "port": getattr(args, "port", None),
        "host": getattr(args, "host", None),
    }
    if getattr(args, "no_migrate", False):
        overrides["migrate_on_start"] = False
    return Config.from_env(**overrides)


def _serve(args: argparse.Namespace) -> int:
    from service.server import serve

    config = _config(args)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except Exception as exc:  # noqa: BLE001 - a start-up failure is reported in one line, not a trace
        from db.migrate import SchemaMismatch

        if isinstance(exc, SchemaMismatch):
            print(f"nexus-data: refusing to start: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from db import migrate
    from db.database import Database

    config = _config(args)
    database = Database(config.database_url, config.pool)
    try:
        if args.revision == "head":
            migrate.upgrade(database.engine)
        else:
            migrate.downgrade(database.engine, args.revision)
        print(f"schema at {migrate.current_revision(database.engine)}")
    finally:
        database.dispose()
    return 0


def _check(args: argparse.Namespace) -> int:
    from db import migrate
    from db.database import Database

    database = Database(_config(args).database_url)
    try:
        migrate.check(database.engine)
        print(f"schema at head {migrate.head_revision()}")
        return 0
    except migrate.SchemaMismatch as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        database.dispose()


def _seed(args: argparse.Namespace) -> int:
    from db import migrate, seed
    from db.database import Database

    config = _config(args)
    database = Database(config.database_url, config.pool)
    try:
        migrate.upgrade(database.engine)
        counts = seed.seed(database, users=args.users, projects=args.projects, tasks_per_project=args.tasks, progress=not args.quiet)
        print(", ".join(f"{n} {name}" for name, n in counts.items()))
    finally:
        database.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexus-data", description="Nexus Data Service")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="SQLAlchemy URL; default from DATABASE_URL / DB_* / DB_PATH")

    serve = sub.add_parser("serve", help="run the gRPC server")
    common(serve)
    serve.add_argument("--host", help="bind address (NEXUS_HOST, default [::])")
    serve.add_argument("--port", type=int, help="port (NEXUS_PORT, default 50051)")
    serve.add_argument("--no-migrate", action="store_true", help="refuse to start unless the schema is at head")
    serve.set_defaults(func=_serve)

    mig = sub.add_parser("migrate", help="upgrade the schema to head, or downgrade to a revision")
    common(mig)
    mig.add_argument("revision", nargs="?", default="head")
    mig.set_defaults(func=_migrate)

    chk = sub.add_parser("check-schema", help="exit 1 unless the schema is at head")
    common(chk)
    chk.set_defaults(func=_check)

    seed = sub.add_parser("seed", help="fill the database with realistic sample data")
    common(seed)
    seed.add_argument("--users", type=int, default=50)
    seed.add_argument("--projects", type=int, default=20)
    seed.add_argument("--tasks", type=int, default=25, help="tasks per project")
    seed.add_argument("--quiet", action="store_true", help="no progress bar")
    seed.set_defaults(func=_seed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
