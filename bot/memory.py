"""Memory beyond the window: a running summary per conversation.

Messages that no longer fit the window are folded into a summary written by
the model, in the background after the reply is delivered, at most one at a
time per conversation. The stored messages stay; the summary records the
newest message it covers, so it can be rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence

from bot.llm_call import CallLimits, stream_reply
from bot.prompt import build_prompt
from bot.providers.base import Provider, ProviderError, Usage
from bot.records import AuditRecord, ConversationRef, StoredMessage, utcnow_precise
from bot.sanitize import storable
from bot.settings import Settings
from bot.slots import ModelSlots
from bot.store import Store
from bot.text_fit import longest_prefix
from bot.tokens import MESSAGE_OVERHEAD, PROMPT_OVERHEAD, Calibration, count_tokens

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


SUMMARY_PAGE = 200  # unsummarised messages read at a time, oldest first


def _line(msg: StoredMessage) -> str:
    return f"{'User' if msg.role == 'user' else 'Assistant'}: {msg.content}"


def _fit_lines(batch: Sequence[StoredMessage], room: int) -> str:
    """The batch as transcript lines within `room` tokens: what the user said is
    cut last (the summary keeps facts about the user, not the assistant's words)."""
    lines = [_line(m) for m in batch]
    if count_tokens("\n".join(lines)) <= room:
        return "\n".join(lines)
    users = sum(count_tokens(line) + 1 for line, m in zip(lines, batch, strict=True)
                if m.role == "user")
    replies = sum(1 for m in batch if m.role != "user")
    share = (room - users) // max(1, replies) - 1
    lines = [line if m.role == "user" else truncate_tokens(line, max(4, share))
             for line, m in zip(lines, batch, strict=True)]
    text = "\n".join(lines)
    if count_tokens(text) > room:
        share = max(8, room // len(batch) - 1)
        text = "\n".join(truncate_tokens(line, share) for line in lines)
    return truncate_tokens(text, max(8, room))


class Summarizer:
    """Background summaries; at most one running per conversation.

    The summary folds the oldest unsummarised messages first, in batches that
    fill the summary call's window, and is written after every batch: a pass
    cut off (exit, /reset) keeps what it folded. Summary calls take the
    service's model slots as background work, so a reply never waits behind
    one that had not started yet, and `LLM_CONCURRENCY=1` is one call at a time.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        provider: Provider,
        running_calls: set[asyncio.Task[None]],
        audit: Callable[[AuditRecord], Awaitable[None]],
        slots: ModelSlots | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._provider = provider
        self._running_calls = running_calls
        self._audit = audit  # the service's one audit path (it redacts secrets)
        self._slots = slots or ModelSlots(settings.LLM_CONCURRENCY)
        self._calibration = calibration or Calibration()  # the estimate, per model
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # Conversations reset while their summary ran (entries live as long as the task).
        self._stale: set[int] = set()
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
        task.add_done_callback(lambda _: self._ended(conversation_id))
        return True

    def _ended(self, conversation_id: int) -> None:
        self._tasks.pop(conversation_id, None)
        self._stale.discard(conversation_id)

    async def forget(self, conversation_id: int) -> None:
        """Before a /reset: stop this conversation's summary and wait until it has.

        Its batches check the mark before every model call and every write, so
        nothing said before the reset reaches the model once the reset answers.
        """
        task = self._tasks.get(conversation_id)
        if task is None:
            return
        self._stale.add(conversation_id)
        task.cancel()
        await asyncio.wait([task], timeout=self._settings.LLM_TIMEOUT)  # bounded

    async def wait_idle(self) -> None:
        """Wait for running summaries (tests; callers bound it)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def history_budget(self) -> int:
        """Tokens the stored messages may take in a prompt, beside the summary."""
        s = self._settings
        system = count_tokens(s.SYSTEM_PROMPT) + MESSAGE_OVERHEAD
        # Leave room for a typical new message (an eighth of the budget).
        return max(64, s.prompt_budget - system - s.summary_cap - s.prompt_budget // 8)

    def _keep_budget(self) -> int:
        return self.history_budget() // 2  # hysteresis: folded down to half, not every turn

    def due(self, history: Sequence[StoredMessage], new_user: str, new_reply: str) -> bool:
        """Whether a summary would fold anything: the unsummarised messages
        (`history`, the newest of them, then the new exchange) outgrow what is
        kept, and what is beyond holds a whole exchange."""
        roles = [m.role for m in history] + ["user", "assistant"]
        texts = [m.content for m in history] + [new_user, new_reply]
        kept = 0
        for i in range(len(texts) - 1, -1, -1):
            kept += count_tokens(texts[i]) + MESSAGE_OVERHEAD
            if kept > self._keep_budget():
                return "assistant" in roles[: i + 1]
        return False

    async def _keep_from(self, conversation_id: int, after_id: int) -> int | None:
        """The id from which messages are kept unsummarised; None: nothing to fold."""
        keep_budget = self._keep_budget()
        # Every message costs at least MESSAGE_OVERHEAD: this many always exceed the budget.
        newest = await self._store.recent_messages(
            conversation_id, keep_budget // MESSAGE_OVERHEAD + 2, after_id=after_id)
        kept = 0
        for i in range(len(newest) - 1, -1, -1):
            kept += count_tokens(newest[i].content) + MESSAGE_OVERHEAD
            if kept > keep_budget:
                return newest[i + 1].id if i + 1 < len(newest) else newest[i].id + 1
        return None

    def _summary_max_tokens(self) -> int:
        return math.ceil(self._settings.summary_cap * 1.5)

    def _prompt_budget(self) -> int:
        """What a summary prompt may take: the window minus the summary's reply limit."""
        return max(64, self._settings.CONTEXT_TOKENS - self._summary_max_tokens())

    def _model(self, model: str) -> str:
        return self._settings.SUMMARY_MODEL or model

    def _estimated_budget(self, model: str) -> int:
        """The prompt budget in estimated tokens (before the model's correction)."""
        return int(self._prompt_budget() / self._calibration.factor(self._model(model)))

    def _batch_budget(self, old: str, model: str) -> int:
        """Estimated tokens the new messages may take in one summary call beside `old`."""
        s = self._settings
        instructions = count_tokens(SUMMARY_INSTRUCTIONS.format(cap=s.summary_cap, language=""))
        frame = 48 + 2 * MESSAGE_OVERHEAD + PROMPT_OVERHEAD  # headings and the language line
        spare = self._estimated_budget(model) - instructions - frame - count_tokens(old)
        return max(32, spare * 15 // 16)  # the estimate of joined lines is not additive

    async def _run(self, conversation_id: int, ref: ConversationRef, chat_id: str,
                   model: str) -> None:
        try:
            await self.summarize(conversation_id, ref, chat_id, model)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
            log.warning("summary of %s failed: %s", ref.key, detail)

    async def summarize(self, conversation_id: int, ref: ConversationRef, chat_id: str,
                        model: str) -> bool:
        """Fold what no longer fits into the summary, oldest first; True if written."""
        # One summariser per conversation across processes (PostgreSQL): if
        # another holds it, it folds these messages.
        async with self._store.summary_lock(conversation_id) as ours:
            if not ours:
                log.info("summary of %s skipped: another process is writing it", ref.key)
                return False
            return await self._summarize(conversation_id, ref, chat_id, model, utcnow_precise())

    async def _summarize(self, conversation_id: int, ref: ConversationRef, chat_id: str,
                         model: str, started: str) -> bool:
        summary = await self._store.summary(conversation_id)
        cursor = summary.upto_id if summary else 0
        text = summary.text if summary else ""
        keep_from = await self._keep_from(conversation_id, cursor)
        if keep_from is None:
            return False
        written = False
        batch: list[StoredMessage] = []
        exchange: list[StoredMessage] = []  # fold whole exchanges only
        used = 0
        budget = self._batch_budget(text, model)
        while page := await self._store.messages_range(
                conversation_id, cursor, keep_from - 1, limit=SUMMARY_PAGE):
            cursor = page[-1].id
            for msg in page:
                exchange.append(msg)
                if msg.role != "assistant":
                    continue
                cost = sum(count_tokens(_line(m)) + 1 for m in exchange)
                if batch and used + cost > budget:
                    folded = await self._fold_batch(conversation_id, text, batch, ref,
                                                    chat_id, model, started)
                    if folded is None:
                        return written
                    text, written = folded, True
                    batch, used, budget = [], 0, self._batch_budget(folded, model)
                batch += exchange
                used += cost
                exchange = []
        if batch:
            folded = await self._fold_batch(conversation_id, text, batch, ref, chat_id, model,
                                            started)
            written = written or folded is not None
        return written

    async def _fold_batch(self, conversation_id: int, old: str, batch: list[StoredMessage],
                          ref: ConversationRef, chat_id: str, model: str,
                          started: str) -> str | None:
        """Fold one batch and write it; None when the conversation was reset meanwhile."""
        if conversation_id in self._stale or not await self._store.messages_range(
                conversation_id, batch[0].id - 1, batch[0].id, limit=1):
            log.info("summary of %s stopped: the conversation was reset", ref.key)
            return None
        text = await self._fold(old, batch, ref, chat_id, model, started)
        if conversation_id in self._stale or not await self._store.save_summary(
                conversation_id, text, batch[-1].id):
            log.info("summary of %s dropped: the conversation was reset", ref.key)
            return None
        return text

    async def _fold(self, old: str, batch: Sequence[StoredMessage], ref: ConversationRef,
                    chat_id: str, model: str, started: str) -> str:
        s = self._settings
        cap = s.summary_cap
        lang = summary_language([m.content for m in batch if m.role == "user"])
        system = SUMMARY_INSTRUCTIONS.format(cap=cap, language=lang)
        head = f"Current summary:\n{old or '(none yet)'}\n\nNew messages:\n"
        tail = "\n\nWrite the updated summary."
        # An exchange longer than a whole batch is cut to fit: the call must fit the window.
        room = (self._estimated_budget(model) - PROMPT_OVERHEAD - 2 * MESSAGE_OVERHEAD
                - count_tokens(system) - count_tokens(head + tail) - 8)
        lines = _fit_lines(batch, room)
        text = await self._call(system, head + lines + tail, ref, chat_id, model, started)
        if count_tokens(text) > cap:
            text = await self._call(SHORTEN_INSTRUCTIONS.format(cap=cap, language=lang), text,
                                    ref, chat_id, model, started)
        return truncate_tokens(storable(text).strip(), cap)

    async def _call(self, system: str, user: str, ref: ConversationRef, chat_id: str,
                    model: str, started_at: str) -> str:
        s = self._settings
        summary_model = self._model(model)
        factor = self._calibration.factor(summary_model)
        prompt = build_prompt(system, [], user, self._prompt_budget(), factor=factor)
        audit = AuditRecord(
            platform=ref.platform, user_id=ref.user_id, chat_id=chat_id,
            conversation=ref.key, user_input=user, kind="summary",
            provider=self._provider.name, model=summary_model,
            read_at=started_at,  # a forget after the pass began voids the record
        )
        started = time.monotonic()
        parts: list[str] = []
        try:
            async with self._slots.background():
                started = time.monotonic()  # model time, not the wait for a slot
                async for item in stream_reply(
                    self._provider, summary_model, prompt.messages,
                    num_ctx=s.CONTEXT_TOKENS, max_tokens=self._summary_max_tokens(),
                    limits=CallLimits(s.LLM_TIMEOUT, s.LLM_STALL_TIMEOUT, 0),
                    running=self._running_calls,
                ):
                    if isinstance(item, Usage):
                        audit.prompt_tokens = item.prompt_tokens
                        self._calibration.observe(summary_model, prompt.messages,
                                                  item.prompt_tokens)
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
