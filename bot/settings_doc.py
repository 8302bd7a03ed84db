"""Every setting's name, default and meaning, read from bot/settings.py's source.

`--help` must be fast, and importing pydantic costs more than the whole
budget; parsing the module's source with `ast` costs a few milliseconds and
keeps one definition of every setting.
"""

from __future__ import annotations

import ast
from pathlib import Path

_SOURCE = Path(__file__).with_name("settings.py")


def _literal(node: ast.expr | None, consts: dict[str, object]) -> object:
    if node is None:
        return None
    if isinstance(node, ast.Name):
        return consts.get(node.id)
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _text(node: ast.expr | None) -> str:
    """A description: one string, or implicitly concatenated strings."""
    value = _literal(node, {})
    return value if isinstance(value, str) else ""


def describe_settings() -> list[tuple[str, str, str]]:
    """(name, default as .env text, meaning) in the order settings.py defines them."""
    tree = ast.parse(_SOURCE.read_text(encoding="utf-8"))
    consts: dict[str, object] = {}
    rows: list[tuple[str, str, str]] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            consts[node.targets[0].id] = _literal(node.value, consts)
        if isinstance(node, ast.ClassDef) and node.name == "Settings":
            for item in node.body:
                if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                    continue
                call = item.value
                if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Field"):
                    continue
                default = _literal(call.args[0], consts) if call.args else None
                desc = next((_text(k.value) for k in call.keywords if k.arg == "description"), "")
                shown = "" if default is None else str(default)
                rows.append((item.target.id, shown, desc))
    return rows


def settings_help() -> str:
    rows = describe_settings()
    width = max(len(name) for name, _, _ in rows)
    lines = ["settings (environment or .env; the environment wins):"]
    for name, default, desc in rows:
        shown = default if len(default) <= 40 else default[:37] + "..."
        lines.append(f"  {name.ljust(width)}  {desc}" + (f" [default: {shown}]" if shown else ""))
    return "\n".join(lines)
