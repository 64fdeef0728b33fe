//! The NBD gateway: exports the cluster's volumes by name at
//! `nbd://<node address>:10809/<volume>` for QEMU, libnbd, fio and the kernel.
//!
//! Nothing is implemented yet: see the NBD gateway issue.
