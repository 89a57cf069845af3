//! Helpers for the integration tests: starting daemons, free ports, temp dirs.
