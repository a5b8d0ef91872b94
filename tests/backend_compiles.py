"""Counting the programs a process compiles, for the tests that bound them."""

import jax


class BackendCompiles:
    """Counts the programs this process compiles (jax reports a read from the persistent
    compilation cache as a compile too)."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def _listener(self, event, _, **kwargs):
        if event.endswith("backend_compile_duration"):
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)
