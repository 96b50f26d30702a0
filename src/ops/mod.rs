//! The operators' tools beside the worker: the dead-letter queue (`dlq list`, `dlq replay`) and
//! requests in bulk (`enqueue --file`, and the HTTP intake's batches). The worker itself never
//! calls into here; `cli` and `intake` do.

pub mod batch;
pub mod dlq;
