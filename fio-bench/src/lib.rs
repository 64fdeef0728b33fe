//! The benchmark harness: fio suites against Basalt volumes and against
//! baselines in the same run.
//!
//! - [`raw`]: the raw-file baseline (fio, io_uring, O_DIRECT) and the
//!   workloads and figures the storage benches (`store-bench`,
//!   `client-bench`) share.
//! - [`suite`]: the fio suites in `jobs/` and one run of a workload on a
//!   target, with the daemons' CPU time read from /proc.
//! - [`report`]: the markdown table and the SVG plot.
//!
//! The `fio-bench` binary puts them together: dev cluster, volumes,
//! baselines, the suite, the outputs.

pub mod raw;
pub mod report;
pub mod suite;
