"""Conversations: the pure turn state machine, the Redis store, prompt windows."""
