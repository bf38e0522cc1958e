#![forbid(unsafe_code)]
//! Helpers for tests that drive real QEMU binaries.
