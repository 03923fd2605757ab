"""OpenAI-compatible HTTP server: `create_app(async_engine)` and `build_server(app)`."""

from llmserve.server.openai.app import create_app
from llmserve.server.openai.server import DrainingServer, build_server, serve_in_background

__all__ = ["DrainingServer", "build_server", "create_app", "serve_in_background"]
