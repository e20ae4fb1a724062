"""OpenAI-compatible server and web chat: `create_app(engine, model_name)` / `serve(engine, ...)`."""
from .app import create_app, serve

__all__ = ["create_app", "serve"]
