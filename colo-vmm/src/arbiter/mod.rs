//! The arbiter: which replica of a protected VM may serve, decided by etcd (a consensus store
//! that stays correct through partitions) rather than by the replicas' own heartbeat, which
//! cannot tell a dead peer from a cut link.
//!
//! - [`etcd`]: a client of etcd's v3 JSON gateway (leases, transactions, ranges);
//! - [`claim`]: this replica's lease-backed claim on the VM's key, and standby registrations.

pub mod claim;
pub mod etcd;

#[cfg(test)]
pub mod testing;
