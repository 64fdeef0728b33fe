//! The benchmark harness: fio suites against Basalt volumes and against
//! baselines in the same run.
//!
//! - [`raw`]: the raw-file baseline (fio, io_uring, O_DIRECT) and the
//!   workloads and figures the storage benches (`store-bench`,
//!   `client-bench`) share. The full `fio-bench` command is the fio-bench
//!   issue.

pub mod raw;
