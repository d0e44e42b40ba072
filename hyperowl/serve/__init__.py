"""OpenAI-compatible HTTP server for mPLUG-Owl3 (`hyperowl serve`): chat completions with images and
videos, streaming, continuous batching, limits, Prometheus metrics and a small chat web page.

`hyperowl.serve.app.create_app(model, processor, settings)` builds the FastAPI application
(`hyperowl.serve.settings.ServerSettings`); `hyperowl.serve.cli` runs it with uvicorn. Nothing is
imported here, so the `hyperowl` command does not need the `serve` extra for its other subcommands.
"""
