"""The model backends: catalog, OpenAI-compatible client (retries, breaker, fallback, stream resume),
vLLM metrics; ``local/`` starts and stops local model servers."""
