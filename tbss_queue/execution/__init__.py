"""Execution on a worker node: one attempt of one command, from the message to its record
(`attempt` is the pipeline, top to bottom; `tasks` is its Celery face), the runner and its
guard, the policy of what may run, and the node's own health."""
