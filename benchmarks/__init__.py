"""Benchmarks of the bot's core, storage and platform adapters: `python -m benchmarks`.

Not run by the tests. Every figure is measured on this machine against
127.0.0.1 only; the model is an in-process stand-in that streams a fixed
reply instantly, so what is measured is the bot's own cost.
"""
