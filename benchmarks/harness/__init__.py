"""What every benchmark suite shares: ``flags`` (the command-line flags), ``report`` (machine info,
timing, JSON/JSONL writers, plots), ``request_set`` (the request set and task popularity),
``bundle`` (random adapter bundles), ``setups`` (the measured serving setups) and ``paths`` (the
results folder of each suite)."""
