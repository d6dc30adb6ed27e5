//! tern-replication
