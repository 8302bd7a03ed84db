"""Memory beyond the window: a running summary per conversation.

Messages that no longer fit the window are folded into a summary written by
the model, in the background after the reply is delivered, at most one at a
time per conversation. The stored messages stay; the summary records the
newest message it covers, so it can be rebuilt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence

from bot.llm_call import CallLimits, stream_reply
from bot.prompt import build_prompt
from bot.providers.base import Provider, ProviderError, Usage
from bot.records import AuditRecord, ConversationRef, StoredMessage
from bot.sanitize import storable
from bot.settings import Settings
from bot.store import Store
from bot.text_fit import longest_prefix
from bot.tokens import MESSAGE_OVERHEAD, count_tokens

log = logging.getLogger(__name__)

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

SUMMARY_INSTRUCTIONS = (
    "You keep the memory of a chat assistant about one user. Update the summary with the "
    "new messages. Keep what a good friend would remember: the user's name and how they "
    "like to be addressed, their preferences, facts they stated about themselves and their "
    "life, decisions made, promises, and questions still open. Drop small talk and the "
    "assistant's explanations unless the user relied on them. Write short factual lines, "
    "third person, no preamble. Stay under {cap} tokens. {language}"
)
SHORTEN_INSTRUCTIONS = (
    "Shorten this memory summary to under {cap} tokens. Keep names, preferences, facts "
    "about the user, decisions and open questions; drop the rest. {language}"
)


def summary_language(texts: Sequence[str]) -> str:
    """Tell the summariser the user's language (Chinese gets a Chinese summary)."""
    joined = "".join(texts)
    cjk = len(_CJK.findall(joined))
    letters = sum(ch.isalpha() for ch in joined) or 1
    if cjk / letters > 0.3:
        return "用使用者的語言（中文，與使用者相同的繁體或簡體）撰寫摘要。"
    return "Write the summary in the language the user writes in."


def truncate_tokens(text: str, cap: int, counter: Callable[[str], int] = count_tokens) -> str:
    """The longest prefix of whole lines (else characters) within `cap` tokens."""
    if counter(text) <= cap:
        return text
    lines = text.splitlines()
    while lines and counter("\n".join(lines)) > cap:
        lines.pop()
    if lines:
        return "\n".join(lines)
    return text[: longest_prefix(text, cap, counter)]


class Summarizer:
    """Background summaries; at most one running per conversation."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        provider: Provider,
        running_calls: set[asyncio.Task[None]],
        audit: Callable[[AuditRecord], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._store = store
        self._provider = provider
        self._running_calls = running_calls
        self._audit = audit  # the service's one audit path (it redacts secrets)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # Summaries never take a reply's model slot.
        self._slots = asyncio.Semaphore(max(1, settings.LLM_CONCURRENCY // 2))
        self.failures = 0

    @property
    def busy(self) -> int:
        return len(self._tasks)

    def schedule(self, conversation_id: int, ref: ConversationRef, chat_id: str,
                 model: str) -> bool:
        """Start summarising unless this conversation already is."""
        if conversation_id in self._tasks:
            return False
        task = asyncio.create_task(self._run(conversation_id, ref, chat_id, model))
        self._tasks[conversation_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(conversation_id, None))
        return True

    async def wait_idle(self) -> None:
        """Wait for running summaries (tests; callers bound it)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def history_budget(self) -> int:
        """Tokens the stored messages may take in a prompt, beside the summary."""
        s = self._settings
        system = count_tokens(s.SYSTEM_PROMPT) + MESSAGE_OVERHEAD
        # Leave room for a typical new message (an eighth of the budget).
        return max(64, s.prompt_budget - system - s.summary_cap - s.prompt_budget // 8)

    async def _run(self, conversation_id: int, ref: ConversationRef, chat_id: str,
                   model: str) -> None:
        try:
            await self.summarize(conversation_id, ref, chat_id, model)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failures += 1
            log.exception("summary of %s failed", ref.key)

    async def summarize(self, conversation_id: int, ref: ConversationRef, chat_id: str,
                        model: str) -> bool:
        """Fold what no longer fits into the summary; True if one was written."""
        s = self._settings
        summary = await self._store.summary(conversation_id)
        upto = summary.upto_id if summary else 0
        pending = await self._store.recent_messages(conversation_id, 2000, after_id=upto)
        keep_budget = self.history_budget() // 2  # hysteresis: not every turn
        kept_tokens = 0
        keep_from = len(pending)
        for i in range(len(pending) - 1, -1, -1):
            kept_tokens += count_tokens(pending[i].content) + MESSAGE_OVERHEAD
            if kept_tokens > keep_budget:
                break
            keep_from = i
        fold = pending[:keep_from]
        while fold and fold[-1].role != "assistant":  # fold whole exchanges only
            fold.pop()
        if not fold:
            return False
        text = summary.text if summary else ""
        # Fold in batches that fit the model's window beside the old summary.
        batch: list[StoredMessage] = []
        batch_budget = max(128, s.prompt_budget - s.summary_cap * 2 - 200)
        used = 0
        for msg in fold:
            c = count_tokens(msg.content) + MESSAGE_OVERHEAD
            if batch and used + c > batch_budget:
                text = await self._fold(text, batch, ref, chat_id, model)
                batch, used = [], 0
            batch.append(msg)
            used += c
        if batch:
            text = await self._fold(text, batch, ref, chat_id, model)
        written = await self._store.save_summary(conversation_id, text, fold[-1].id)
        if not written:
            log.info("summary of %s dropped: conversation was reset meanwhile", ref.key)
        return written

    async def _fold(self, old: str, batch: Sequence[StoredMessage], ref: ConversationRef,
                    chat_id: str, model: str) -> str:
        s = self._settings
        cap = s.summary_cap
        lang = summary_language([m.content for m in batch if m.role == "user"])
        lines = [f"{'User' if m.role == 'user' else 'Assistant'}: {m.content}" for m in batch]
        user = (f"Current summary:\n{old or '(none yet)'}\n\nNew messages:\n"
                + "\n".join(lines) + "\n\nWrite the updated summary.")
        system = SUMMARY_INSTRUCTIONS.format(cap=cap, language=lang)
        text = await self._call(system, user, ref, chat_id, model, cap)
        if count_tokens(text) > cap:
            text = await self._call(SHORTEN_INSTRUCTIONS.format(cap=cap, language=lang), text,
                                    ref, chat_id, model, cap)
        return truncate_tokens(storable(text).strip(), cap)

    async def _call(self, system: str, user: str, ref: ConversationRef, chat_id: str,
                    model: str, cap: int) -> str:
        s = self._settings
        summary_model = s.SUMMARY_MODEL or model
        prompt = build_prompt(system, [], user, s.CONTEXT_TOKENS)
        audit = AuditRecord(
            platform=ref.platform, user_id=ref.user_id, chat_id=chat_id,
            conversation=ref.key, user_input=user, kind="summary",
            provider=self._provider.name, model=summary_model,
        )
        started = time.monotonic()
        parts: list[str] = []
        try:
            async with self._slots:
                async for item in stream_reply(
                    self._provider, summary_model, prompt.messages,
                    num_ctx=s.CONTEXT_TOKENS, max_tokens=math.ceil(cap * 1.5),
                    limits=CallLimits(s.LLM_TIMEOUT, s.LLM_STALL_TIMEOUT, 0),
                    running=self._running_calls,
                ):
                    if isinstance(item, Usage):
                        audit.prompt_tokens = item.prompt_tokens
                        audit.completion_tokens = item.completion_tokens
                    else:
                        if not parts:
                            audit.first_token_time = time.monotonic() - started
                        parts.append(item)
        except (ProviderError, Exception) as exc:
            audit.status = "error"
            audit.error = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
            audit.response_time = time.monotonic() - started
            await self._audit(audit)
            raise
        audit.model_response = "".join(parts)
        audit.response_time = time.monotonic() - started
        await self._audit(audit)
        return audit.model_response
