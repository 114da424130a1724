#![no_std]
// The library target exists so that `observer` can name this crate as a build dependency; the
// programs themselves are in the `observer` binary target (src/main.rs).
