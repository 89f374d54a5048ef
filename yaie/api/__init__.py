"""The OpenAI-compatible HTTP server (Litestar on uvicorn)."""
