//! Tests of the gates together, beyond each module's own.

mod model;
