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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from bot.llm_call import CallLimits, stream_reply
from bot.prompt import TooLong, build_prompt
from bot.providers.base import Provider, ProviderError, Usage
from bot.records import AuditRecord, ConversationRef, StoredMessage, utcnow_precise
from bot.sanitize import storable
from bot.settings import Settings
from bot.slots import ModelSlots
from bot.store import Store
from bot.text_fit import longest_prefix
from bot.tokens import MESSAGE_OVERHEAD, PROMPT_OVERHEAD, Calibration, count_tokens

if TYPE_CHECKING:
    from bot.models import ModelWindows

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


def _fit_lines(batch: Sequence[StoredMessage], room: int,
               counter: Callable[[str], int] = count_tokens) -> str:
    """The batch as transcript lines within `room` tokens: what the user said is
    cut last (the summary keeps facts about the user, not the assistant's words)."""
    lines = [_line(m) for m in batch]
    if counter("\n".join(lines)) <= room:
        return "\n".join(lines)
    users = sum(counter(line) + 1 for line, m in zip(lines, batch, strict=True)
                if m.role == "user")
    replies = sum(1 for m in batch if m.role != "user")
    share = (room - users) // max(1, replies) - 1
    lines = [line if m.role == "user" else truncate_tokens(line, max(4, share), counter)
             for line, m in zip(lines, batch, strict=True)]
    text = "\n".join(lines)
    if counter(text) > room:
        share = max(8, room // len(batch) - 1)
        text = "\n".join(truncate_tokens(line, share, counter) for line in lines)
    return truncate_tokens(text, max(8, room), counter)


@dataclass(frozen=True, slots=True)
class SummaryLimits:
    """One summary call's limits, from its model's real window and token factors."""

    model: str
    num_ctx: int
    max_tokens: int  # the summary's reply limit
    budget: int  # what the prompt may take: the window minus the reply limit
    cap: int  # tokens the summary may keep
    count: Callable[[str], int]  # the model's (calibrated) estimate
    # When the pass began reading the conversation: a forget after it voids its records.
    read_at: str = ""


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
        windows: ModelWindows | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._provider = provider
        self._running_calls = running_calls
        self._audit = audit  # the service's one audit path (it redacts secrets)
        self._slots = slots or ModelSlots(settings.LLM_CONCURRENCY)
        self._calibration = calibration or Calibration()  # the estimate, per model
        # Each model's real window and token factors: the service's, so a summary
        # is fitted as its chat prompts are.
        self._windows = windows
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

    def history_budget(self, budget: int | None = None,
                       counter: Callable[[str], int] = count_tokens) -> int:
        """Tokens the stored messages may take in a prompt of `budget` (the chat
        model's window minus its reply), beside the summary."""
        s = self._settings
        budget = s.prompt_budget if budget is None else budget
        system = counter(s.SYSTEM_PROMPT) + MESSAGE_OVERHEAD
        # Leave room for a typical new message (an eighth of the budget).
        return max(64, budget - system - s.summary_cap - budget // 8)

    def due(self, history: Sequence[StoredMessage], new_user: str, new_reply: str, *,
            budget: int | None = None, counter: Callable[[str], int] = count_tokens) -> bool:
        """Whether a summary would fold anything: the unsummarised messages
        (`history`, the newest of them, then the new exchange) outgrow what is
        kept, and what is beyond holds a whole exchange."""
        keep_budget = self.history_budget(budget, counter) // 2  # hysteresis: down to half
        roles = [m.role for m in history] + ["user", "assistant"]
        texts = [m.content for m in history] + [new_user, new_reply]
        kept = 0
        for i in range(len(texts) - 1, -1, -1):
            kept += counter(texts[i]) + MESSAGE_OVERHEAD
            if kept > keep_budget:
                return "assistant" in roles[: i + 1]
        return False

    async def _keep_from(self, conversation_id: int, after_id: int, keep_budget: int,
                         counter: Callable[[str], int]) -> int | None:
        """The id from which messages are kept unsummarised; None: nothing to fold."""
        # Every message costs at least MESSAGE_OVERHEAD: this many always exceed the budget.
        newest = await self._store.recent_messages(
            conversation_id, keep_budget // MESSAGE_OVERHEAD + 2, after_id=after_id)
        kept = 0
        for i in range(len(newest) - 1, -1, -1):
            kept += counter(newest[i].content) + MESSAGE_OVERHEAD
            if kept > keep_budget:
                return newest[i + 1].id if i + 1 < len(newest) else newest[i].id + 1
        return None

    def _model(self, model: str) -> str:
        return self._settings.SUMMARY_MODEL or model

    async def _window(self, model: str) -> tuple[int, int, Callable[[str], int]]:
        """(num_ctx, chat prompt budget, counter) of `model`, as the service sees them."""
        if self._windows is not None:
            win = await self._windows.window(model)
            factors = await self._windows.factors(model)
            return win.num_ctx, win.budget, factors.count
        s = self._settings
        return s.CONTEXT_TOKENS, s.prompt_budget, self._calibration.factors(model).count

    async def limits(self, model: str) -> SummaryLimits:
        """The summary call's limits on the summary model's real window."""
        summary_model = self._model(model)
        num_ctx, _, counter = await self._window(summary_model)
        cap = self._settings.summary_cap
        # A small window keeps at least three quarters for the prompt, as chat replies do.
        max_tokens = min(math.ceil(cap * 1.5), max(16, num_ctx // 4))
        # Batches fill the prompt to the token, which chat prompts rarely do: a
        # sixteenth spare for the estimate's error where the server's count differs.
        return SummaryLimits(model=summary_model, num_ctx=num_ctx, max_tokens=max_tokens,
                             budget=(num_ctx - max_tokens) * 15 // 16,
                             cap=min(cap, max(8, max_tokens * 2 // 3)), count=counter)

    @staticmethod
    def _frame(old: str, lim: SummaryLimits, language: str) -> tuple[str, str, str, int]:
        """(system, head, tail, tokens they take with the prompt's overheads)."""
        system = SUMMARY_INSTRUCTIONS.format(cap=lim.cap, language=language)
        head = f"Current summary:\n{old or '(none yet)'}\n\nNew messages:\n"
        tail = "\n\nWrite the updated summary."
        # As build_prompt charges: the prompt, then each message with its overhead.
        fixed = (PROMPT_OVERHEAD + lim.count(system) + MESSAGE_OVERHEAD
                 + lim.count(head + tail) + MESSAGE_OVERHEAD)
        return system, head, tail, fixed

    def _batch_budget(self, old: str, lim: SummaryLimits) -> int:
        """Tokens the new messages may take in one summary call beside `old`."""
        # The longer language line: the batch's language is known only once it is chosen.
        language = max((summary_language(["中文"]), summary_language(["x"])), key=lim.count)
        spare = lim.budget - self._frame(old, lim, language)[3]
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
            return await self._summarize(conversation_id, ref, chat_id, model,
                                         utcnow_precise())

    async def _summarize(self, conversation_id: int, ref: ConversationRef, chat_id: str,
                         model: str, started: str) -> bool:
        summary = await self._store.summary(conversation_id)
        cursor = summary.upto_id if summary else 0
        text = summary.text if summary else ""
        _, chat_budget, chat_counter = await self._window(model)
        keep_from = await self._keep_from(
            conversation_id, cursor, self.history_budget(chat_budget, chat_counter) // 2,
            chat_counter)
        if keep_from is None:
            return False
        lim = replace(await self.limits(model), read_at=started)
        written = False
        batch: list[StoredMessage] = []
        exchange: list[StoredMessage] = []  # fold whole exchanges only
        used = 0
        budget = self._batch_budget(text, lim)
        while page := await self._store.messages_range(
                conversation_id, cursor, keep_from - 1, limit=SUMMARY_PAGE):
            cursor = page[-1].id
            for msg in page:
                exchange.append(msg)
                if msg.role != "assistant":
                    continue
                cost = sum(lim.count(_line(m)) + 1 for m in exchange)
                if batch and used + cost > budget:
                    folded = await self._fold_batch(conversation_id, text, batch, ref,
                                                    chat_id, lim)
                    if folded is None:
                        return written
                    text, written = folded, True
                    batch, used, budget = [], 0, self._batch_budget(folded, lim)
                batch += exchange
                used += cost
                exchange = []
        if batch:
            folded = await self._fold_batch(conversation_id, text, batch, ref, chat_id, lim)
            written = written or folded is not None
        return written

    async def _fold_batch(self, conversation_id: int, old: str, batch: list[StoredMessage],
                          ref: ConversationRef, chat_id: str,
                          lim: SummaryLimits) -> str | None:
        """Fold one batch and write it; None when the conversation was reset meanwhile."""
        if conversation_id in self._stale or not await self._store.messages_range(
                conversation_id, batch[0].id - 1, batch[0].id, limit=1):
            log.info("summary of %s stopped: the conversation was reset", ref.key)
            return None
        text = await self._fold(old, batch, ref, chat_id, lim)
        if conversation_id in self._stale or not await self._store.save_summary(
                conversation_id, text, batch[-1].id):
            log.info("summary of %s dropped: the conversation was reset", ref.key)
            return None
        return text

    async def _fold(self, old: str, batch: Sequence[StoredMessage], ref: ConversationRef,
                    chat_id: str, lim: SummaryLimits) -> str:
        lang = summary_language([m.content for m in batch if m.role == "user"])
        system, head, tail, fixed = self._frame(old, lim, lang)
        # An exchange longer than a whole batch is cut to fit: the call must fit the window.
        room = lim.budget - fixed
        prompt = None
        for _ in range(4):  # the joined lines can count a little over their parts
            user = head + _fit_lines(batch, room, lim.count) + tail
            try:
                prompt = build_prompt(system, [], user, lim.budget, counter=lim.count)
                break
            except TooLong as exc:
                room -= max(1, exc.tokens - lim.budget)
        if prompt is None:
            raise TooLong(fixed, lim.budget)
        text = await self._call(prompt.messages, user, ref, chat_id, lim)
        if lim.count(text) > lim.cap:
            shorten = build_prompt(SHORTEN_INSTRUCTIONS.format(cap=lim.cap, language=lang), [],
                                   truncate_tokens(text, lim.budget // 2, lim.count),
                                   lim.budget, counter=lim.count)
            text = await self._call(shorten.messages, text, ref, chat_id, lim)
        return truncate_tokens(storable(text).strip(), lim.cap, lim.count)

    async def _call(self, messages: list[dict[str, str]], user: str, ref: ConversationRef,
                    chat_id: str, lim: SummaryLimits) -> str:
        s = self._settings
        audit = AuditRecord(
            platform=ref.platform, user_id=ref.user_id, chat_id=chat_id,
            conversation=ref.key, user_input=user, kind="summary",
            provider=self._provider.name, model=lim.model,
            read_at=lim.read_at or utcnow_precise(),  # a forget after it voids the record
        )
        started = time.monotonic()
        parts: list[str] = []
        try:
            async with self._slots.background():
                started = time.monotonic()  # model time, not the wait for a slot
                async for item in stream_reply(
                    self._provider, lim.model, messages,
                    num_ctx=lim.num_ctx, max_tokens=lim.max_tokens,
                    limits=CallLimits(s.LLM_TIMEOUT, s.LLM_STALL_TIMEOUT, 0),
                    running=self._running_calls,
                ):
                    if isinstance(item, Usage):
                        audit.prompt_tokens = item.prompt_tokens
                        await self._observe(lim.model, messages, item.prompt_tokens)
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
        if audit.prompt_tokens is None:  # the server sent no counts: estimate, marked so
            audit.est_prompt_tokens = PROMPT_OVERHEAD + sum(
                lim.count(m["content"]) + MESSAGE_OVERHEAD for m in messages)
        audit.response_time = time.monotonic() - started
        await self._audit(audit)
        return audit.model_response

    async def _observe(self, model: str, messages: list[dict[str, str]],
                       reported: int | None) -> None:
        """Correct the estimate from the server's count (kept by the windows)."""
        if self._windows is not None:
            await self._windows.observe(model, messages, reported)
        else:
            self._calibration.observe(model, messages, reported)
