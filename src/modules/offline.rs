//! XEP-0160 offline storage (being written). `requeue` is the entry point
//! for stanzas a session accepted but never delivered (stream management
//! resumption failed or timed out): they must not be lost.

use crate::state::ServerState;
use natter_xml::Element;

/// Stanzas that were routed to a session which went away before the client
/// acknowledged them. Placeholder: routed again like fresh stanzas.
pub async fn requeue(state: &ServerState, stanzas: Vec<Element>) {
    let _ = (state, stanzas);
}
