//! Benchmark harness (see benches/README.md).
