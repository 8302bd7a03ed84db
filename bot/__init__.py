"""memorybot: a self-hosted LLM chat bot that remembers each user."""
