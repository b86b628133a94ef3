use crate::creds::saslprep;
use crate::error::{malformed, SaslError};

/// RFC 4616 `[authzid] NUL authcid NUL passwd`.
///
/// Returns (authzid, authcid, password); authzid is `None` when empty. The authcid is
/// SASLprepped (like the SCRAM username) so both paths look users up the same way; the
/// password is returned as sent, since [`crate::verify_password`] prepares it itself.
pub fn parse_plain(msg: &[u8]) -> Result<(Option<String>, String, String), SaslError> {
    let msg = std::str::from_utf8(msg).map_err(|_| malformed("PLAIN message is not UTF-8"))?;
    let mut parts = msg.split('\0');
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("PLAIN message needs exactly two NUL separators"));
    };
    if authcid.is_empty() {
        return Err(malformed("empty authcid"));
    }
    if password.is_empty() {
        return Err(malformed("empty password"));
    }
    let authcid = saslprep(authcid)?;
    if authcid.is_empty() {
        return Err(malformed("empty authcid"));
    }
    let authzid = (!authzid.is_empty()).then(|| authzid.to_owned());
    Ok((authzid, authcid, password.to_owned()))
}
