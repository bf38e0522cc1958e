//! `migproxy run` and `migproxy healthcheck`: settings merged from flags, file and defaults;
//! binding, the accept loops and the drain on SIGTERM; the admin endpoint.

pub mod accept;
pub mod admin;
pub mod healthcheck;
pub mod serve;
pub mod settings;
pub mod shutdown;
