"""`python -m bot`: the command line (bot.cli)."""

from bot.cli import main

raise SystemExit(main())
