//! Typed stanza and stream errors, and the one place they become XML
//! (RFC 6120 §4.9 stream errors, §8.3 stanza errors).

use natter_xml::{Element, NS_CLIENT, NS_STREAM};

pub const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const NS_STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    Auth,
    Cancel,
    Continue,
    Modify,
    Wait,
}

/// RFC 6120 §8.3.3 defined conditions (those natter uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    BadRequest,
    Conflict,
    FeatureNotImplemented,
    Forbidden,
    InternalServerError,
    ItemNotFound,
    JidMalformed,
    NotAcceptable,
    NotAllowed,
    NotAuthorized,
    PolicyViolation,
    RecipientUnavailable,
    RegistrationRequired,
    RemoteServerNotFound,
    RemoteServerTimeout,
    ResourceConstraint,
    ServiceUnavailable,
    UndefinedCondition,
    UnexpectedRequest,
}

impl Condition {
    pub fn name(self) -> &'static str {
        use Condition::*;
        match self {
            BadRequest => "bad-request",
            Conflict => "conflict",
            FeatureNotImplemented => "feature-not-implemented",
            Forbidden => "forbidden",
            InternalServerError => "internal-server-error",
            ItemNotFound => "item-not-found",
            JidMalformed => "jid-malformed",
            NotAcceptable => "not-acceptable",
            NotAllowed => "not-allowed",
            NotAuthorized => "not-authorized",
            PolicyViolation => "policy-violation",
            RecipientUnavailable => "recipient-unavailable",
            RegistrationRequired => "registration-required",
            RemoteServerNotFound => "remote-server-not-found",
            RemoteServerTimeout => "remote-server-timeout",
            ResourceConstraint => "resource-constraint",
            ServiceUnavailable => "service-unavailable",
            UndefinedCondition => "undefined-condition",
            UnexpectedRequest => "unexpected-request",
        }
    }

    /// XEP-0086 legacy error code, which some clients still read (profanity
    /// treats a missing OMEMO device list as empty only on `code='404'`).
    pub fn legacy_code(self) -> u16 {
        use Condition::*;
        match self {
            BadRequest | JidMalformed => 400,
            NotAuthorized => 401,
            RegistrationRequired => 407,
            // Not in XEP-0086 (RFC 6120 added it); 403 as ejabberd does.
            Forbidden | PolicyViolation => 403,
            ItemNotFound | RecipientUnavailable | RemoteServerNotFound => 404,
            NotAllowed => 405,
            NotAcceptable => 406,
            Conflict => 409,
            InternalServerError | ResourceConstraint | UndefinedCondition => 500,
            FeatureNotImplemented => 501,
            RemoteServerTimeout => 504,
            ServiceUnavailable => 503,
            UnexpectedRequest => 400,
        }
    }

    /// The error type RFC 6120 §8.3.3 suggests for each condition.
    pub fn default_type(self) -> ErrorType {
        use Condition::*;
        match self {
            BadRequest | JidMalformed | NotAcceptable | PolicyViolation => ErrorType::Modify,
            Forbidden | NotAuthorized | RegistrationRequired => ErrorType::Auth,
            InternalServerError | RecipientUnavailable | RemoteServerTimeout
            | ResourceConstraint | UnexpectedRequest => ErrorType::Wait,
            _ => ErrorType::Cancel,
        }
    }
}

/// An error answered to one stanza; the session goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StanzaError {
    pub kind: ErrorType,
    pub condition: Condition,
    pub text: Option<String>,
    /// An application-specific condition (RFC 6120 §8.3.4): (name, namespace, attributes,
    /// text-only children), e.g. XEP-0191 `<blocked xmlns='urn:xmpp:blocking:errors'/>`.
    pub app: Option<AppCondition>,
}

/// (element name, namespace, attributes, children with text) of an
/// application-specific condition.
pub type AppCondition = (
    &'static str,
    &'static str,
    Vec<(&'static str, String)>,
    Vec<(&'static str, String)>,
);

impl StanzaError {
    pub fn new(condition: Condition) -> Self {
        StanzaError {
            kind: condition.default_type(),
            condition,
            text: None,
            app: None,
        }
    }

    pub fn with_text(condition: Condition, text: impl Into<String>) -> Self {
        StanzaError {
            text: Some(text.into()),
            ..Self::new(condition)
        }
    }

    /// Add an application-specific condition element `<name xmlns=ns/>`.
    pub fn with_app(mut self, name: &'static str, ns: &'static str) -> Self {
        self.app = Some((name, ns, Vec::new(), Vec::new()));
        self
    }

    /// Add an attribute to the application-specific condition.
    pub fn with_app_attr(mut self, name: &'static str, value: impl Into<String>) -> Self {
        if let Some((_, _, attrs, _)) = &mut self.app {
            attrs.push((name, value.into()));
        }
        self
    }

    /// Add a child with text to the application-specific condition, in
    /// its namespace (XEP-0363's `<max-file-size>`).
    pub fn with_app_child(mut self, name: &'static str, text: impl Into<String>) -> Self {
        if let Some((_, _, _, children)) = &mut self.app {
            children.push((name, text.into()));
        }
        self
    }

    pub fn with_type(mut self, kind: ErrorType) -> Self {
        self.kind = kind;
        self
    }

    /// The `<error/>` child.
    pub fn to_element(&self) -> Element {
        let kind = match self.kind {
            ErrorType::Auth => "auth",
            ErrorType::Cancel => "cancel",
            ErrorType::Continue => "continue",
            ErrorType::Modify => "modify",
            ErrorType::Wait => "wait",
        };
        let mut e = Element::new("error", NS_CLIENT)
            .with_attr("type", kind)
            .with_attr("code", self.condition.legacy_code().to_string())
            .with_child(Element::new(self.condition.name(), NS_STANZAS));
        if let Some(t) = &self.text {
            e.append_child(
                Element::new("text", NS_STANZAS)
                    .with_attr("xml:lang", "en")
                    .with_text(t.clone()),
            );
        }
        if let Some((name, ns, attrs, children)) = &self.app {
            let mut a = Element::new(*name, *ns);
            for (k, v) in attrs {
                a.set_attr(*k, v.clone());
            }
            for (k, v) in children {
                a.append_child(Element::new(*k, *ns).with_text(v.clone()));
            }
            e.append_child(a);
        }
        e
    }

    /// The error reply to `original` (RFC 6120 §8.3.1): same name and id,
    /// `to`/`from` swapped, type='error', the original payload kept for
    /// messages and presence, dropped for IQs.
    pub fn reply_to(&self, original: &Element) -> Element {
        let mut reply = Element::new(original.name.clone(), NS_CLIENT);
        if let Some(id) = original.attr("id") {
            reply.set_attr("id", id);
        }
        if let Some(from) = original.attr("from") {
            reply.set_attr("to", from);
        }
        if let Some(to) = original.attr("to") {
            reply.set_attr("from", to);
        }
        reply.set_attr("type", "error");
        if original.name != "iq" {
            for c in original.children() {
                if c.name != "error" {
                    reply.append_child(c.clone());
                }
            }
        }
        reply.append_child(self.to_element());
        reply
    }
}

impl From<natter_store::StoreError> for StanzaError {
    fn from(e: natter_store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        StanzaError::new(Condition::InternalServerError)
    }
}

/// RFC 6120 §4.9.3 stream error conditions natter sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamCondition {
    BadFormat,
    Conflict,
    ConnectionTimeout,
    HostUnknown,
    InternalServerError,
    InvalidFrom,
    InvalidNamespace,
    InvalidXml,
    NotAuthorized,
    NotWellFormed,
    PolicyViolation,
    ResourceConstraint,
    RestrictedXml,
    SystemShutdown,
    UndefinedCondition,
    UnsupportedStanzaType,
    UnsupportedVersion,
}

impl StreamCondition {
    pub fn name(self) -> &'static str {
        use StreamCondition::*;
        match self {
            BadFormat => "bad-format",
            Conflict => "conflict",
            ConnectionTimeout => "connection-timeout",
            HostUnknown => "host-unknown",
            InternalServerError => "internal-server-error",
            InvalidFrom => "invalid-from",
            InvalidNamespace => "invalid-namespace",
            InvalidXml => "invalid-xml",
            NotAuthorized => "not-authorized",
            NotWellFormed => "not-well-formed",
            PolicyViolation => "policy-violation",
            ResourceConstraint => "resource-constraint",
            RestrictedXml => "restricted-xml",
            SystemShutdown => "system-shutdown",
            UndefinedCondition => "undefined-condition",
            UnsupportedStanzaType => "unsupported-stanza-type",
            UnsupportedVersion => "unsupported-version",
        }
    }

    pub fn from_name(name: &str) -> StreamCondition {
        use StreamCondition::*;
        match name {
            "bad-format" => BadFormat,
            "invalid-namespace" => InvalidNamespace,
            "not-well-formed" => NotWellFormed,
            "policy-violation" => PolicyViolation,
            "restricted-xml" => RestrictedXml,
            "invalid-xml" => InvalidXml,
            _ => UndefinedCondition,
        }
    }
}

/// An error that ends the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamError {
    pub condition: StreamCondition,
    pub text: Option<String>,
    /// An application-specific condition (RFC 6120 §4.9.4), e.g. XEP-0198
    /// `<handled-count-too-high xmlns='urn:xmpp:sm:3' h='…' send-count='…'/>`.
    pub app: Option<Element>,
}

impl StreamError {
    pub fn new(condition: StreamCondition) -> Self {
        StreamError {
            condition,
            text: None,
            app: None,
        }
    }

    pub fn with_text(condition: StreamCondition, text: impl Into<String>) -> Self {
        StreamError {
            condition,
            text: Some(text.into()),
            app: None,
        }
    }

    /// Add an application-specific condition element.
    pub fn with_app(mut self, app: Element) -> Self {
        self.app = Some(app);
        self
    }

    pub fn to_element(&self) -> Element {
        let mut e = Element::new("error", NS_STREAM)
            .with_child(Element::new(self.condition.name(), NS_STREAMS));
        if let Some(t) = &self.text {
            e.append_child(
                Element::new("text", NS_STREAMS)
                    .with_attr("xml:lang", "en")
                    .with_text(t.clone()),
            );
        }
        if let Some(a) = &self.app {
            e.append_child(a.clone());
        }
        e
    }
}

impl From<natter_xml::XmlError> for StreamError {
    fn from(e: natter_xml::XmlError) -> Self {
        StreamError::with_text(StreamCondition::from_name(e.condition()), e.to_string())
    }
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.condition.name())?;
        if let Some(t) = &self.text {
            write!(f, ": {t}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iq_error_reply_swaps_addresses_and_drops_payload() {
        let iq = Element::new("iq", NS_CLIENT)
            .with_attr("id", "1")
            .with_attr("from", "a@x/r")
            .with_attr("to", "x")
            .with_attr("type", "get")
            .with_child(Element::new("query", "urn:x"));
        let r = StanzaError::new(Condition::ServiceUnavailable).reply_to(&iq);
        assert_eq!(r.attr("to"), Some("a@x/r"));
        assert_eq!(r.attr("from"), Some("x"));
        assert_eq!(r.attr("type"), Some("error"));
        assert!(r.get_child("query", "urn:x").is_none());
        let err = r.get_child("error", NS_CLIENT).unwrap();
        assert_eq!(err.attr("type"), Some("cancel"));
        assert!(err.get_child("service-unavailable", NS_STANZAS).is_some());
        assert_eq!(err.attr("code"), Some("503"));
    }

    #[test]
    fn legacy_codes_follow_xep0086() {
        use Condition::*;
        for (c, code) in [
            (BadRequest, "400"),
            (Conflict, "409"),
            (FeatureNotImplemented, "501"),
            (Forbidden, "403"),
            (InternalServerError, "500"),
            (ItemNotFound, "404"),
            (JidMalformed, "400"),
            (NotAcceptable, "406"),
            (NotAllowed, "405"),
            (NotAuthorized, "401"),
            (PolicyViolation, "403"),
            (RecipientUnavailable, "404"),
            (RegistrationRequired, "407"),
            (RemoteServerNotFound, "404"),
            (ResourceConstraint, "500"),
            (ServiceUnavailable, "503"),
            (UndefinedCondition, "500"),
            (UnexpectedRequest, "400"),
        ] {
            let e = StanzaError::new(c).to_element();
            assert_eq!(e.attr("code"), Some(code), "{}", c.name());
        }
    }
}
