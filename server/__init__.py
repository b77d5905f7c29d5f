"""Rapport's gateway: the WebSocket and HTTP surfaces, configuration, engines."""
