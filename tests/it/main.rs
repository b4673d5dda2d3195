//! The service's integration tests, one binary (it links once), one module
//! per area. Every test starts its own throwaway PostgreSQL and nats-server
//! (crate `outbox-testkit`) on free loopback ports and runs the real
//! `outbox-tailer` binary against them; helpers live in [`common`].
//!
//! Run one area with `scripts/test --test it <module>::`, e.g. `soak::`.

// A test binary has no API: `pub` here only means "shared between modules".
#![allow(unreachable_pub)]

mod common;

mod cluster;
mod compose;
mod dashboards;
mod failover;
mod failures;
mod harness;
mod headers;
mod image;
mod kubernetes;
mod layering;
mod marker;
mod memory;
mod nats_outage;
mod observability;
mod odd_input;
mod partitioned;
mod pg_failover;
mod republish;
mod retention;
mod row_filter;
mod schema;
mod shutdown;
mod silent;
mod soak;
mod startup;
mod sweeper;
mod tailer;
mod tls;
