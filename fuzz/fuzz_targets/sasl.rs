//! SASL (natter_sasl): PLAIN messages, the server side of SCRAM fed raw
//! client-first/client-final messages, whole SCRAM exchanges between the
//! crate's client and server for arbitrary usernames, passwords and
//! authzids, and SASLprep.
//!
//! Input: byte 0 picks the mode (low two bits) and flags (other bits); the
//! rest is the mode's data, fields separated by '\n'.
//!
//! Checks, besides "no panic":
//! - PLAIN: the password is accepted exactly when it SASLpreps to the
//!   account's password; the authcid comes back SASLprepped and non-empty;
//! - raw SCRAM: an unknown user never authenticates, and a failed step
//!   leaves the exchange failed;
//! - whole exchange: the right password always succeeds (and the client
//!   verifies the server's signature), a wrong password or any change of one
//!   byte of the client-final-message always fails;
//! - SASLprep is idempotent (a prepared name prepares to itself: logins and
//!   stored account names agree).
#![no_main]

use libfuzzer_sys::fuzz_target;
use natter_sasl::client::{ClientBinding, ScramClient};
use natter_sasl::{
    derive_credentials, parse_plain, verify_password, ChannelBinding, FakeSaltKey, Hash, SaslError,
    ScramServer,
};

const PASSWORD: &str = "pencil";
const SALT: &[u8] = b"fuzz-salt-16byte";

fn hash_of(flags: u8) -> Hash {
    if flags & 1 == 0 {
        Hash::Sha256
    } else {
        Hash::Sha1
    }
}

fn binding() -> ChannelBinding {
    ChannelBinding {
        kind: "tls-exporter",
        data: vec![7; 32],
    }
}

fn plain(data: &[u8]) {
    let Ok((authzid, authcid, password)) = parse_plain(data) else {
        return;
    };
    assert!(!authcid.is_empty());
    assert!(!authcid.contains('\0'));
    assert!(authzid.as_deref().is_none_or(|z| !z.is_empty()));
    // The authcid is already prepared: preparing again changes nothing.
    let again = stringprep::saslprep(&authcid).expect("prepared authcid prepares again");
    assert_eq!(again, authcid);
    let creds = derive_credentials(Hash::Sha256, PASSWORD, SALT, 1).unwrap();
    let expected = stringprep::saslprep(&password).is_ok_and(|p| p == PASSWORD);
    assert_eq!(
        verify_password(&creds, Hash::Sha256, &password),
        expected,
        "PLAIN password {password:?}"
    );
}

fn raw_scram(flags: u8, data: &[u8]) {
    let (plus, bound, known) = (flags & 2 != 0, flags & 4 != 0, flags & 8 != 0);
    let mut server = ScramServer::new(hash_of(flags), plus, bound.then(binding));
    let (first, fin) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    if server.client_first(first).is_err() {
        // A failed exchange stays failed.
        assert!(server.server_first(None, &FakeSaltKey::from_bytes([7; 32])).is_empty());
        assert!(server.client_final(fin).is_err());
        return;
    }
    let creds = derive_credentials(hash_of(flags), PASSWORD, SALT, 1).unwrap();
    let sf = server.server_first(known.then_some(&creds), &FakeSaltKey::from_bytes([7; 32]));
    let sf = String::from_utf8(sf).expect("server-first-message is UTF-8");
    assert!(sf.starts_with("r="), "{sf}");
    let r = server.client_final(fin);
    if !known {
        assert!(r.is_err(), "unknown user authenticated: {r:?}");
    }
    // Whatever happened, the exchange is over.
    assert!(server.client_final(fin).is_err());
}

fn exchange(flags: u8, data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut fields = text.split('\n');
    let (Some(user), Some(password)) = (fields.next(), fields.next()) else {
        return;
    };
    let authzid = fields.next();
    let tamper = fields.next().map(str::as_bytes);
    let hash = hash_of(flags);
    let Ok(creds) = derive_credentials(hash, password, SALT, 1 + u32::from(flags >> 5 & 1)) else {
        return;
    };
    // flags bits 1-2: channel binding as the client says it.
    let (plus, server_binding, client_binding) = match (flags >> 1) & 3 {
        0 => (false, None, ClientBinding::Unsupported),
        1 => (false, None, ClientBinding::NotAdvertised),
        2 => (true, Some(binding()), ClientBinding::Use(binding())),
        _ => (false, Some(binding()), ClientBinding::Unsupported),
    };
    let wrong_password = flags & 8 != 0;
    let client_password = if wrong_password {
        format!("{password}x")
    } else {
        password.to_owned()
    };
    let mut client = ScramClient::with_nonce(
        hash,
        user,
        &client_password,
        authzid,
        client_binding,
        "fyko+d2lbbFgONRv9qkxdawL",
    );
    let mut server = ScramServer::new(hash, plus, server_binding);
    let Ok(first) = server.client_first(&client.client_first()) else {
        return;
    };
    assert_eq!(
        Some(first.username.clone()),
        stringprep::saslprep(user).ok().map(|u| u.into_owned()),
        "username does not survive the saslname encoding"
    );
    assert_eq!(first.authzid.as_deref(), authzid.filter(|z| !z.is_empty()));
    let known = flags & 16 == 0;
    let sf = server.server_first(known.then_some(&creds), &FakeSaltKey::from_bytes([7; 32]));
    let Ok(mut fin) = client.client_final(&sf) else {
        // Only a password SASLprep refuses can make the client give up.
        assert!(wrong_password, "client refused server-first {sf:?}");
        return;
    };
    let tampered = match tamper {
        Some([pos, x, ..]) if *x != 0 && !fin.is_empty() => {
            let i = usize::from(*pos) % fin.len();
            fin[i] ^= *x;
            true
        }
        _ => false,
    };
    let r = server.client_final(&fin);
    if known && !tampered && !wrong_password {
        let v = r.unwrap_or_else(|e| panic!("right password refused: {e}"));
        client
            .verify_server_final(&v)
            .expect("client verifies the server signature");
    } else {
        assert!(
            r.is_err(),
            "authenticated: known={known} tampered={tampered} wrong_password={wrong_password}"
        );
        if let Err(e) = r {
            assert!(matches!(
                e,
                SaslError::NotAuthorized | SaslError::MalformedRequest(_)
            ));
        }
    }
}

fn saslprep(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = stringprep::saslprep(s) {
        let again = stringprep::saslprep(&p)
            .unwrap_or_else(|e| panic!("SASLprep({s:?}) = {p:?} is refused by SASLprep: {e}"));
        assert_eq!(again, p, "SASLprep is not idempotent on {s:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let flags = sel >> 2;
    match sel & 3 {
        0 => plain(rest),
        1 => raw_scram(flags, rest),
        2 => exchange(flags, rest),
        _ => saslprep(rest),
    }
});
