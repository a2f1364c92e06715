"""The queue's state in Redis: the Celery app and broker connection, batches and their
records (`BatchStore`, with the Lua scripts in `lua/` that change them atomically), publishing
messages and the recovery of lost ones. Knows nothing of how a node runs a command."""
