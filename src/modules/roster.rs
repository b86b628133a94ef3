//! RFC 6121 §2: roster management (placeholder, being written).

use super::Module;
use async_trait::async_trait;

pub struct Roster;

#[async_trait]
impl Module for Roster {}
