//! XEP-0199: XMPP Ping (client → server). Server → client pings, the
//! heartbeat that finds dead connections, live in the c2s session.

use super::{Cx, Iq, IqResult, Module};
use async_trait::async_trait;

pub const NS: &str = "urn:xmpp:ping";

pub struct Ping;

#[async_trait]
impl Module for Ping {
    fn name(&self) -> &'static str {
        "ping"
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "ping")]
    }
    async fn handle_iq(&self, _cx: &Cx<'_>, _iq: &Iq) -> IqResult {
        Ok(None)
    }
}
