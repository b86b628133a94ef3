/// SASL failures, one per RFC 6120 §6.5 condition the server may send.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaslError {
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    #[error("not authorized")]
    NotAuthorized,
    #[error("invalid authzid")]
    InvalidAuthzid,
    #[error("invalid mechanism")]
    InvalidMechanism,
    #[error("encryption required")]
    EncryptionRequired,
    #[error("aborted")]
    Aborted,
    #[error("temporary auth failure")]
    TemporaryAuthFailure,
}

impl SaslError {
    /// The RFC 6120 §6.5 element name for `<failure/>`.
    pub fn condition(&self) -> &'static str {
        match self {
            SaslError::MalformedRequest(_) => "malformed-request",
            SaslError::NotAuthorized => "not-authorized",
            SaslError::InvalidAuthzid => "invalid-authzid",
            SaslError::InvalidMechanism => "invalid-mechanism",
            SaslError::EncryptionRequired => "encryption-required",
            SaslError::Aborted => "aborted",
            SaslError::TemporaryAuthFailure => "temporary-auth-failure",
        }
    }
}

pub(crate) fn malformed(why: &str) -> SaslError {
    SaslError::MalformedRequest(why.to_owned())
}
