//! The benchmark harness: a fixed fio suite against Basalt volumes and against
//! baselines (raw file with io_uring, qemu-nbd) in the same run.
//!
//! Nothing is implemented yet: see the fio-bench issue.
