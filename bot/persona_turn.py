"""What a persona changes in one chat turn: system text, window, reply limit, request options."""

from __future__ import annotations

from dataclasses import dataclass

from bot.models import Window
from bot.personas import Persona, ollama_options, openai_fields, reply_tokens
from bot.providers.base import NO_OPTIONS, CallOptions

# The provider adds the window and the reply limit itself (under its own names).
_OLLAMA_OWN = ("num_ctx", "num_predict")
_OPENAI_OWN = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True, slots=True)
class PersonaTurn:
    """One turn's view of its persona (None: the plain bot)."""

    persona: Persona | None

    @property
    def name(self) -> str:
        return self.persona.name if self.persona is not None else ""

    def system(self, default: str) -> str:
        """The persona's system prompt replaces SYSTEM_PROMPT."""
        return self.persona.system if self.persona is not None else default

    def examples(self) -> list[dict[str, str]]:
        return self.persona.example_messages() if self.persona is not None else []

    def window(self, win: Window) -> Window:
        """The model's window as this persona uses it.

        A persona's num_ctx only lowers the window; its num_predict replaces
        REPLY_TOKENS as the room kept for the reply, but the prompt keeps at
        least half the window.
        """
        p = self.persona
        if p is None:
            return win
        n = min(win.num_ctx, p.parameters.get("num_ctx") or win.num_ctx)
        wanted = p.num_predict
        if wanted is None or wanted < 0:
            reserve = win.reply if n == win.num_ctx else min(win.reply, max(16, n // 4))
        else:
            reserve = min(wanted, max(16, n // 2))
        return Window(num_ctx=n, reply=reserve, budget=n - reserve, info=win.info)

    def max_tokens(self, win: Window, prompt_tokens: int) -> int:
        """The reply limit sent: num_predict (else the window's), never beyond what is left."""
        if self.persona is None:
            return win.reply
        return reply_tokens(self.persona.num_predict, win.reply,
                            max(1, win.num_ctx - prompt_tokens))

    def options(self, win: Window, max_tokens: int) -> CallOptions:
        """The persona's parameters as each provider's request takes them."""
        if self.persona is None:
            return NO_OPTIONS
        ollama = ollama_options(self.persona, num_ctx=win.num_ctx, num_predict=max_tokens)
        openai = openai_fields(self.persona, max_tokens=max_tokens)
        return CallOptions(
            ollama={k: v for k, v in ollama.items() if k not in _OLLAMA_OWN},
            openai={k: v for k, v in openai.items() if k not in _OPENAI_OWN})


NO_PERSONA = PersonaTurn(None)
