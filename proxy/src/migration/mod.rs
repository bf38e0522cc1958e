//! One live migration as the proxy sees it: identifying a new connection, grouping connections
//! into migrations, dialing the destination in order, pumping the main channel through the
//! decoder and the rewrite, and the profiles that rewrite uses.

pub mod admission;
pub mod connection;
pub mod destination_end;
pub mod dial;
pub mod identify;
pub mod log_budget;
pub mod metrics;
pub mod postcopy;
pub mod profile_source;
pub mod pump;
pub mod read_buffers;
pub mod registry;
pub mod rewrite;
pub mod source_reference;
pub mod state;
pub mod write_queue;
