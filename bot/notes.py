"""Notes the user keeps (/remember, /forget N): limits, replies, and the prompt's section."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


async def remember(store: Store, conversation_id: int, text: str) -> str:
    """Keep `text` as a note; the reply says what happened."""
    text = " ".join(text.split())
    if not text:
        return "Tell me what to remember: /remember TEXT (for example, /remember I'm vegetarian)."
    if len(text) > MAX_NOTE_CHARS:
        return (f"That note is {len(text):,} characters long; a note may have at most "
                f"{MAX_NOTE_CHARS}. Please make it shorter.")
    notes = await store.notes(conversation_id)
    if len(notes) >= MAX_NOTES:
        return (f"You already have {MAX_NOTES} notes, the most I keep. Delete one with "
                "/forget N first (/memory lists them).")
    await store.add_note(conversation_id, text)
    return (f"Noted (note {len(notes) + 1}). I'll keep it in mind in this conversation; "
            "/memory lists your notes, /forget N deletes one.")


async def forget(store: Store, conversation_id: int, arg: str) -> str:
    """Delete note N (as /memory numbers them)."""
    notes = await store.notes(conversation_id)
    arg = arg.strip().lstrip("#")
    if not arg.isdigit():
        return ("Which note? /forget N deletes note N; /memory lists them."
                if notes else "You have no notes. Keep one with /remember TEXT.")
    n = int(arg)
    if not 1 <= n <= len(notes):
        if not notes:
            return "You have no notes. Keep one with /remember TEXT."
        return f"There is no note {n}; you have {len(notes)} (see /memory)."
    note = notes[n - 1]
    if not await store.delete_note(conversation_id, note.id):
        return f"Note {n} was already deleted."
    return f"Deleted note {n}: {note.text}"
