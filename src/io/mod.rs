//! The I/O layer. Everything here may touch disk; nothing in `core` may.

pub mod migration_table;
