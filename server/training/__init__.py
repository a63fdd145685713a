"""Training jobs of ``talora-serve``: onboard a task through the API (docs/serving.md, "Onboarding a task
through the API").

``store`` keeps each job's state on disk under ``<store>/.talora/jobs/<id>/``; ``examples`` checks a job's
labelled examples with the task-file validation of ``talora.adapters.data`` (the CLI's ``--task-files``);
``manager`` queues jobs, runs each in a worker process (``worker``: ``talora-train target``'s code, with its
own thread budget) and installs the result through the registry's load path.
"""
