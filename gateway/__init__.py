"""The HTTP gateway (FastAPI): best-of-n, OpenAI-compatible endpoints, feedback."""
