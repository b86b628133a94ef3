//! JID helpers for the message path.

use jid::{BareJid, FullJid, Jid};

/// The bare JID of a JID, cut from a copy of it. `to_bare` in the jid crate
/// builds it with `format!` (about a thousand instructions, ten times this),
/// and routing one message takes several.
pub trait Bare {
    fn bare(&self) -> BareJid;
}

impl Bare for Jid {
    fn bare(&self) -> BareJid {
        self.clone().into_bare()
    }
}

impl Bare for FullJid {
    fn bare(&self) -> BareJid {
        self.clone().into_bare()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_is_to_bare() {
        for s in ["a@b/c", "a@b", "b/c", "b", "ä@ß.example/x y"] {
            let j = Jid::new(s).unwrap();
            assert_eq!(j.bare(), j.to_bare(), "{s}");
            assert_eq!(j.bare().as_str(), j.to_bare().as_str(), "{s}");
            if let Ok(f) = FullJid::new(s) {
                assert_eq!(f.bare(), f.to_bare(), "{s}");
            }
        }
    }
}
