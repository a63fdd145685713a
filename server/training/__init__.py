"""Training jobs of ``talora-serve``: ``examples`` (checks), ``store`` (on disk), ``manager`` (queue, worker
processes, install), ``worker`` (``talora-train target`` in a process). docs/serving.md, "Onboarding a task
through the API"."""
