"""DeepSeek-compatible HTTP server."""
from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
