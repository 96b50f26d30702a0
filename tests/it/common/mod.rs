//! The harness lives in `crates/test-support`, shared with the benches; here it is under the
//! names these tests use (`common::bin` for the worker as a process).

pub use test_support::{process as bin, *};
