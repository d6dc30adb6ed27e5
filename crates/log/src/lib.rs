//! tern-log
