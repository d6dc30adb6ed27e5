//! tern-client
