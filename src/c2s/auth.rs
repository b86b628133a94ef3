//! SASL (RFC 6120 §6): SCRAM-SHA-1/256(-PLUS) and PLAIN, with the
//! failed-login throttle and fake salts for unknown names.

use super::*;

/// SASL failures tolerated on one connection before it is closed.
const MAX_SASL_FAILURES: u32 = 3;

pub(super) struct Scram {
    server: ScramServer,
    /// The name tried, whether an account or not (failures count on it).
    user: BareJid,
    known: bool,
}

impl Session {
    async fn sasl_failure<T: Transport>(
        &mut self,
        t: &mut T,
        err: SaslError,
        user: Option<&BareJid>,
    ) -> Result<Step, StreamError> {
        self.neg()?.scram = None;
        self.state.metrics.auth_failure(err.condition());
        if matches!(err, SaslError::NotAuthorized) {
            let account = user.map(|u| u.as_str());
            let delay = self.state.throttle.failure(t.peer().ip(), account);
            // The other nodes count it too: a guesser spreading attempts
            // over the balancer meets one budget.
            if let Some(c) = &self.state.cluster {
                crate::cluster::routing::announce_auth_failure(c, t.peer().ip(), account).await;
            }
            // Slows the guesser; a right password is never held back.
            tokio::time::sleep(delay).await;
            self.neg()?.sasl_failures += 1;
            tracing::info!(peer = %t.peer(), user = user.map(|u| u.to_string()), "authentication failed");
        }
        let f = Element::new("failure", NS_SASL).with_child(Element::new(err.condition(), NS_SASL));
        self.send_or_close(t, f).await?;
        if self.neg()?.sasl_failures >= MAX_SASL_FAILURES {
            return Err(StreamError::with_text(
                StreamCondition::PolicyViolation,
                "too many failed authentication attempts",
            ));
        }
        Ok(Step::Continue)
    }

    pub(super) async fn on_sasl<T: Transport>(
        &mut self,
        t: &mut T,
        el: Element,
    ) -> Result<Step, StreamError> {
        let ip = t.peer().ip();
        // Whatever comes, a SCRAM exchange in progress goes on only with it.
        let scram = self.neg()?.scram.take();
        match (el.name.as_str(), scram) {
            ("abort", _) => {
                return self.sasl_failure(t, SaslError::Aborted, None).await;
            }
            ("auth", None) => {}
            ("response", Some(scram)) => {
                let Scram {
                    mut server,
                    user,
                    known,
                } = scram;
                let data = match decode_sasl(&el.text()) {
                    Ok(d) => d,
                    Err(e) => return self.sasl_failure(t, e, Some(&user)).await,
                };
                return match server.client_final(&data) {
                    Ok(v) if known => self.sasl_success(t, user, Some(v)).await,
                    Ok(_) => {
                        self.sasl_failure(t, SaslError::NotAuthorized, Some(&user))
                            .await
                    }
                    Err(e) => self.sasl_failure(t, e, Some(&user)).await,
                };
            }
            _ => {
                return self
                    .sasl_failure(
                        t,
                        SaslError::MalformedRequest("unexpected SASL element".into()),
                        None,
                    )
                    .await
            }
        }
        if !self.plaintext_ok(t) {
            return self
                .sasl_failure(t, SaslError::EncryptionRequired, None)
                .await;
        }
        if self.state.throttle.check(ip) == throttle::Verdict::Refused {
            return self
                .sasl_failure(t, SaslError::TemporaryAuthFailure, None)
                .await;
        }
        let mech = el.attr("mechanism").and_then(Mechanism::from_name);
        let Some(mech) = mech.filter(|m| self.mechanisms(t).contains(m)) else {
            return self
                .sasl_failure(t, SaslError::InvalidMechanism, None)
                .await;
        };
        let data = match decode_sasl(&el.text()) {
            Ok(d) => d,
            Err(e) => return self.sasl_failure(t, e, None).await,
        };
        match mech.hash() {
            None => self.plain(t, &data).await,
            Some(hash) => {
                let plus = matches!(mech, Mechanism::ScramSha1Plus | Mechanism::ScramSha256Plus);
                let mut server = ScramServer::new(hash, plus, t.channel_binding());
                let first = match server.client_first(&data) {
                    Ok(f) => f,
                    Err(e) => return self.sasl_failure(t, e, None).await,
                };
                let user = match self.authzid_check(&first.username, first.authzid.as_deref()) {
                    Ok(u) => u,
                    Err(e) => return self.sasl_failure(t, e, None).await,
                };
                let creds = self.load_creds(&user, hash).await?;
                let challenge = server.server_first(creds.as_ref(), &self.state.fake_salt);
                self.neg()?.scram = Some(Scram {
                    server,
                    user,
                    known: creds.is_some(),
                });
                let c = Element::new("challenge", NS_SASL)
                    .with_text(base64::engine::general_purpose::STANDARD.encode(challenge));
                self.send_or_close(t, c).await
            }
        }
    }

    /// The username as a JID on this stream's domain; an authzid naming
    /// anyone else is refused (ejabberd #4601).
    fn authzid_check(&self, username: &str, authzid: Option<&str>) -> Result<BareJid, SaslError> {
        let user = BareJid::new(&format!("{username}@{}", self.domain()))
            .map_err(|_| SaslError::NotAuthorized)?;
        if let Some(z) = authzid {
            match BareJid::new(z) {
                Ok(z) if z == user => {}
                _ => return Err(SaslError::InvalidAuthzid),
            }
        }
        Ok(user)
    }

    async fn load_creds(
        &self,
        user: &BareJid,
        hash: Hash,
    ) -> Result<Option<natter_sasl::ScramCredentials>, StreamError> {
        let creds = self
            .state
            .store
            .credentials(user.as_str())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "store error during login");
                StreamError::new(StreamCondition::InternalServerError)
            })?;
        Ok(creds.map(|c| {
            let s = match hash {
                Hash::Sha1 => c.sha1,
                Hash::Sha256 => c.sha256,
            };
            natter_sasl::ScramCredentials {
                salt: s.salt,
                iterations: s.iterations,
                stored_key: s.stored_key,
                server_key: s.server_key,
            }
        }))
    }

    pub(super) async fn plain<T: Transport>(
        &mut self,
        t: &mut T,
        data: &[u8],
    ) -> Result<Step, StreamError> {
        let (authzid, authcid, password) = match natter_sasl::parse_plain(data) {
            Ok(p) => p,
            Err(e) => return self.sasl_failure(t, e, None).await,
        };
        let user = match self.authzid_check(&authcid, authzid.as_deref()) {
            Ok(u) => u,
            Err(e) => return self.sasl_failure(t, e, None).await,
        };
        let creds = self.load_creds(&user, Hash::Sha256).await?;
        let known = creds.is_some();
        // An unknown name costs the same PBKDF2 as an account: no timing tell.
        let c = creds.unwrap_or_else(|| self.state.fake_salt.credentials(Hash::Sha256, &authcid));
        // PBKDF2 is slow on purpose; keep it off the async workers.
        let ok = tokio::task::spawn_blocking(move || {
            natter_sasl::verify_password(&c, Hash::Sha256, &password)
        })
        .await
        .unwrap_or(false);
        if ok && known {
            self.sasl_success(t, user, None).await
        } else {
            self.sasl_failure(t, SaslError::NotAuthorized, Some(&user))
                .await
        }
    }

    async fn sasl_success<T: Transport>(
        &mut self,
        t: &mut T,
        user: BareJid,
        additional: Option<Vec<u8>>,
    ) -> Result<Step, StreamError> {
        let mut s = Element::new("success", NS_SASL);
        if let Some(a) = additional {
            s.append_text(base64::engine::general_purpose::STANDARD.encode(a));
        }
        self.send_or_close(t, s).await?;
        tracing::info!(user = %user, transport = t.kind(), "authenticated");
        let ev = crate::modules::Event::Authenticated { user: &user };
        self.state.modules.emit(&self.state, None, &ev).await;
        self.phase = Phase::Authenticated(Box::new(user));
        t.reset();
        t.authenticated();
        t.set_limits(self.limits(true));
        self.neg()?.awaiting_open = true;
        Ok(Step::Restart)
    }
}

fn decode_sasl(text: &str) -> Result<Vec<u8>, SaslError> {
    let text = text.trim();
    // RFC 6120 §6.4.2: "=" is an empty initial response.
    if text.is_empty() || text == "=" {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| SaslError::MalformedRequest("invalid base64".into()))
}
