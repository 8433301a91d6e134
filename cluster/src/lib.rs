//! Shared etcd code: key layout, leases, discovery and rendezvous. Only this crate knows etcd key
//! paths. Filled by the tensor-parallel and routing work.
