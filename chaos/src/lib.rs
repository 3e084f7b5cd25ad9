//! Fault scenarios ("nemeses") for vote-aggregator.
//!
//! This crate will own the seeded fault schedules (kill, pause, broker and database
//! restarts, partitions, the commit-ack window) that run on top of `vote-harness`.
//! It is intentionally empty until the chaos issue lands; the crate exists now so the
//! workspace layout matches DESIGN.md and later work has a home.
