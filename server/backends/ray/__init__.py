"""``talora-serve --ray``: the Serve application, its CLI, the shared adapter store, the Ray-free parts."""
