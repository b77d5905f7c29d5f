"""Clients of the Rapport protocol: the async client, chat CLI, load and eval tools."""
