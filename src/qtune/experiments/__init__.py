"""The papers' protocol as sweeps: specs, tasks, the results store, the runner (``qtune sweep``)."""
