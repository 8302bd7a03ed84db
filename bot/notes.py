"""Notes the user keeps (/remember, /forget N): limits, replies, and the prompt's section."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.i18n import Translator
from bot.records import Note
from bot.store import Store

NOTES_HEADING = "Notes the user asked you to keep"
MAX_NOTE_CHARS = 500
MAX_NOTES = 20


def notes_section(notes: Sequence[Note], budget: int,
                  counter: Callable[[str], int]) -> str:
    """The notes as numbered lines, oldest first, as many as fit `budget` tokens."""
    lines: list[str] = []
    used = 0
    for n, note in enumerate(notes, 1):
        line = f"{n}. {note.text}"
        cost = counter(line + "\n")
        if used + cost > budget:
            break
        lines.append(line)
        used += cost
    return "\n".join(lines)


def numbered(notes: Sequence[Note]) -> str:
    return "\n".join(f"{n}. {note.text}" for n, note in enumerate(notes, 1))


async def remember(store: Store, conversation_id: int, text: str, tr: Translator) -> str:
    """Keep `text` as a note; the reply says what happened (in `tr`'s language)."""
    text = " ".join(text.split())
    if not text:
        return tr.gettext("Tell me what to remember: /remember TEXT (for example, /remember "
                          "I'm vegetarian).")
    if len(text) > MAX_NOTE_CHARS:
        return tr.gettext("That note is {length:,} characters long; a note may have at most "
                          "{limit}. Please make it shorter.", length=len(text),
                          limit=MAX_NOTE_CHARS)
    notes = await store.notes(conversation_id)
    if len(notes) >= MAX_NOTES:
        return tr.gettext("You already have {count} notes, the most I keep. Delete one with "
                          "/forget N first (/memory lists them).", count=MAX_NOTES)
    await store.add_note(conversation_id, text)
    return tr.gettext("Noted (note {number}). I'll keep it in mind in this conversation; "
                      "/memory lists your notes, /forget N deletes one.", number=len(notes) + 1)


async def forget(store: Store, conversation_id: int, arg: str, tr: Translator) -> str:
    """Delete note N (as /memory numbers them); the reply in `tr`'s language."""
    notes = await store.notes(conversation_id)
    arg = arg.strip().lstrip("#")
    none = tr.gettext("You have no notes. Keep one with /remember TEXT.")
    if not arg.isdigit():
        return tr.gettext("Which note? /forget N deletes note N; /memory lists them.") \
            if notes else none
    n = int(arg)
    if not 1 <= n <= len(notes):
        if not notes:
            return none
        return tr.gettext("There is no note {number}; you have {count} (see /memory).",
                          number=n, count=len(notes))
    note = notes[n - 1]
    if not await store.delete_note(conversation_id, note.id):
        return tr.gettext("Note {number} was already deleted.", number=n)
    return tr.gettext("Deleted note {number}: {note}", number=n, note=note.text)
