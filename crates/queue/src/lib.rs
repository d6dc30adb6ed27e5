//! tern-queue
