//! Server side of SASL for natter: SCRAM-SHA-1 / SCRAM-SHA-256 with and without
//! channel binding (RFC 5802, RFC 7677, RFC 5056, RFC 9266) and PLAIN (RFC 4616).
//!
//! The crate never sees stored passwords: accounts keep [`ScramCredentials`], and PLAIN
//! logins are checked against those with [`verify_password`].
//!
//! A small SCRAM client ([`client::ScramClient`]) is included so that the server can be
//! exercised end to end in tests.
#![forbid(unsafe_code)]

pub mod client;
mod creds;
mod error;
mod mechanism;
mod plain;
mod scram;
#[cfg(test)]
mod tests;

pub use creds::{
    derive_credentials, new_credentials, verify_password, ScramCredentials, DEFAULT_ITERATIONS,
};
pub use error::SaslError;
pub use mechanism::{Hash, Mechanism};
pub use plain::parse_plain;
pub use scram::{ChannelBinding, ClientFirst, FakeSaltKey, ScramServer};
