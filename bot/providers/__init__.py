"""LLM providers behind one small interface."""

from __future__ import annotations

from bot.providers.base import Provider, ProviderError, Usage
from bot.settings import Settings


def make_provider(settings: Settings) -> Provider:
    """The provider LLM_PROVIDER names (client libraries imported here only)."""
    if settings.LLM_PROVIDER == "ollama":
        from bot.providers.ollama_provider import OllamaProvider

        return OllamaProvider(settings.OLLAMA_HOST)
    if settings.LLM_PROVIDER == "local":
        from bot.providers.local_provider import LocalProvider

        # The model loads on first use, in the provider's worker thread.
        return LocalProvider(model=settings.LLM_MODEL, path=settings.LOCAL_MODEL or None,
                             n_ctx=settings.LOCAL_CONTEXT, threads=settings.LOCAL_THREADS)
    from bot.providers.openai_provider import OpenAIProvider

    key = settings.OPENAI_API_KEY.get_secret_value() if settings.OPENAI_API_KEY else None
    return OpenAIProvider(base_url=settings.OPENAI_BASE_URL, api_key=key)


__all__ = ["Provider", "ProviderError", "Usage", "make_provider"]
