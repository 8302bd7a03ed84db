"""`python -m bot`: run the bot, chat in the console, and the operator's commands."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

COMMANDS_HELP = """\
commands:
  (none)                       run the bot: Discord if DISCORD_TOKEN is set, Telegram if
                               TELEGRAM_TOKEN is set, both if both; else the console chat
  console                      chat in the terminal (one message a line; works with pipes)
  logs [-n N] [--user ID] [--json]
                               the audit log, oldest first of the last N
  stats [--json]               per model: exchanges, error rate, latency p50/p95, time to
                               first token, tokens in/out
  forget PLATFORM:USER_ID      erase that user's history, summaries, settings and audit
  migrate                      apply the database migrations and exit
  copy-db SRC_URL DST_URL      copy all data between databases, verified by counts
  reindex [--user PLATFORM:ID] build the recall index (words; embeddings with EMBED_MODEL)
                               for stored messages that lack it; resumable
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
                return asyncio.run(ops.logs(settings, args.n, args.user, args.json))
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
    except SettingsError as exc:  # e.g. a token the platform refused
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
