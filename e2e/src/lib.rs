//! End-to-end tests live in `tests/` (one API server per test) and the scale
//! benchmark in `benches/`. The Kubernetes binaries they run are built from
//! the pinned Go modules under `tools/` by `build-tools.sh` and cached.
