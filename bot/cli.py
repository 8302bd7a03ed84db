"""`python -m bot`: run the bot, chat in the console, and the operator's commands."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.audit_queries import AuditFilter

COMMANDS_HELP = """\
commands:
  (none)                       run the bot: Discord if DISCORD_TOKEN is set, Telegram if
                               TELEGRAM_TOKEN is set, both if both; else the console chat
  console                      chat in the terminal (one message a line; works with pipes)
  logs [-n N] [--user ID] [--json] [--since WHEN] [--status S] [--model M]
       [--kind K] [--grep TEXT] [--follow]
                               the audit log, oldest first of the last N matching;
                               WHEN: 2026-12-01, 2026-12-01T10:00, 30m, 2h, 7d;
                               --follow prints new records as they come, until Ctrl-C
  stats [--json]               per model: exchanges, error rate, latency p50/p95, time to
                               first token, tokens in/out
  forget PLATFORM:USER_ID      erase that user's history, summaries, settings and audit
  migrate                      apply the database migrations and exit
  copy-db SRC_URL DST_URL      copy all data between databases, verified by counts
  reindex [--user PLATFORM:ID] build the recall index (words; embeddings with EMBED_MODEL)
                               for stored messages that lack it; resumable
  backup PATH                  a verified copy of the SQLite database while the bot runs
                               (PostgreSQL: prints the pg_dump command to use)
"""


def _parser() -> argparse.ArgumentParser:
    from bot.settings_doc import settings_help

    parser = argparse.ArgumentParser(
        prog="python -m bot",
        description="A self-hosted LLM chat bot for Discord and Telegram that remembers "
                    "each user.",
        epilog=COMMANDS_HELP + "\n" + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="run the bot (the default)")
    sub.add_parser("console", help="chat in the terminal")
    logs = sub.add_parser("logs", help="show the audit log")
    logs.add_argument("-n", type=int, default=20, help="how many records (default 20)")
    logs.add_argument("--user", help="only this user, as platform:user_id")
    logs.add_argument("--json", action="store_true", help="one JSON object a line")
    logs.add_argument("--since", metavar="WHEN",
                      help="only records since: 2026-12-01, 2026-12-01T10:00 (UTC), 2h, 7d")
    logs.add_argument("--status", choices=("ok", "error", "rejected", "cancelled"))
    logs.add_argument("--model", help="only this model")
    logs.add_argument("--kind", help="only this kind of record: chat or summary")
    logs.add_argument("--grep", metavar="TEXT", help="only records whose input or reply "
                                                     "contains TEXT (any case)")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="then print new records as they are written, until Ctrl-C")
    stats = sub.add_parser("stats", help="per-model figures")
    stats.add_argument("--json", action="store_true", help="one JSON object a model")
    forget = sub.add_parser("forget", help="erase everything kept about one user")
    forget.add_argument("who", metavar="PLATFORM:USER_ID")
    sub.add_parser("migrate", help="apply database migrations and exit")
    copy = sub.add_parser("copy-db", help="copy all data between databases")
    copy.add_argument("src", metavar="SRC_URL")
    copy.add_argument("dst", metavar="DST_URL")
    reindex = sub.add_parser("reindex", help="build the recall index where it is missing")
    reindex.add_argument("--user", metavar="PLATFORM:ID", help="only this user's messages")
    backup = sub.add_parser("backup", help="a verified copy of the SQLite database")
    backup.add_argument("path", metavar="PATH")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from bot.personas import PersonaError
    from bot.records import StorageError
    from bot.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from bot.logging_setup import setup_logging

    setup_logging(settings.LOG_LEVEL, settings.LOG_FORMAT, settings.secrets())
    from bot import operator_commands as ops

    try:
        match args.command:
            case None | "run":
                from bot.app import run_bot

                return asyncio.run(run_bot(settings))
            case "console":
                from bot.app import run_bot

                return asyncio.run(run_bot(settings, console=True))
            case "logs":
                try:
                    audit_filter = _audit_filter(args)
                except ValueError as exc:  # a bad --since
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                return asyncio.run(ops.logs(settings, args.n, audit_filter, args.json,
                                            follow=args.follow))
            case "stats":
                return asyncio.run(ops.stats(settings, args.json))
            case "forget":
                return asyncio.run(ops.forget(settings, args.who))
            case "migrate":
                return asyncio.run(ops.migrate(settings))
            case "copy-db":
                return asyncio.run(ops.copy_db(args.src, args.dst))
            case "reindex":
                return asyncio.run(ops.reindex(settings, args.user))
            case "backup":
                return asyncio.run(ops.backup(settings, args.path))
    except SettingsError as exc:  # e.g. a token the platform refused
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PersonaError as exc:  # PERSONAS_FILE changed for the worse since the check
        print(f"error: bad setting PERSONAS_FILE: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _audit_filter(args: argparse.Namespace) -> AuditFilter:
    from bot.operator_commands import parse_since
    from storage.audit_queries import AuditFilter

    return AuditFilter(user=args.user, since=parse_since(args.since) if args.since else None,
                       status=args.status, model=args.model, kind=args.kind, grep=args.grep)
