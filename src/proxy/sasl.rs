//! SASL for keyward's own connections to brokers: PLAIN and SCRAM-SHA-256/512 (RFC 5802,
//! RFC 7677), over SaslHandshake v1 and SaslAuthenticate (KIP-152). Client connections never
//! come here: their SASL exchange passes through keyward untouched.

use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use ring::{digest, hmac, pbkdf2, rand::SecureRandom};

use super::upstream::Session;
use crate::config::SaslMechanism;
use crate::security::{Credentials, Secret};

const HANDSHAKE_VERSION: i16 = 1;
const AUTHENTICATE_VERSION: i16 = 2;

/// SaltedPassword of RFC 5802: `iterations` rounds of PBKDF2. CPU-bound; see
/// [`Scram::client_final_off_runtime`].
fn salt_password(
    kdf: pbkdf2::Algorithm,
    hash: &'static digest::Algorithm,
    iterations: NonZeroU32,
    salt: &[u8],
    password: &Secret,
) -> Vec<u8> {
    let mut salted = vec![0u8; hash.output_len()];
    pbkdf2::derive(
        kdf,
        iterations,
        salt,
        password.expose().as_bytes(),
        &mut salted,
    );
    salted
}

/// Authenticates `session` as `credentials`; returns the session lifetime the broker set, if any.
pub async fn authenticate(
    session: &mut Session,
    credentials: &Credentials,
) -> anyhow::Result<Option<Duration>> {
    let mechanism = credentials.mechanism.as_str();
    let handshake: SaslHandshakeResponse = session
        .call(
            ApiKey::SaslHandshake,
            HANDSHAKE_VERSION,
            &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism)),
        )
        .await?;
    if handshake.error_code != 0 {
        let offered: Vec<&str> = handshake.mechanisms.iter().map(|m| m.as_str()).collect();
        bail!(
            "the broker does not accept SASL mechanism {mechanism} (error {}; it offers [{}])",
            handshake.error_code,
            offered.join(", ")
        );
    }
    let last = match credentials.mechanism {
        SaslMechanism::Plain => {
            let token = format!(
                "\0{}\0{}",
                credentials.username,
                credentials.password.expose()
            );
            step(session, credentials, token.into_bytes()).await?
        }
        SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512 => {
            let mut scram = Scram::new(credentials, &nonce()?);
            let server_first =
                step(session, credentials, scram.client_first().into_bytes()).await?;
            let client_final = scram
                .client_final_off_runtime(&server_first.auth_bytes)
                .await?;
            let server_final = step(session, credentials, client_final.into_bytes()).await?;
            scram.verify_server(&server_final.auth_bytes)?;
            server_final
        }
    };
    Ok(u64::try_from(last.session_lifetime_ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis))
}

async fn step(
    session: &mut Session,
    credentials: &Credentials,
    auth_bytes: Vec<u8>,
) -> anyhow::Result<SaslAuthenticateResponse> {
    let response: SaslAuthenticateResponse = session
        .call(
            ApiKey::SaslAuthenticate,
            AUTHENTICATE_VERSION,
            &SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(auth_bytes)),
        )
        .await?;
    if response.error_code != 0 {
        bail!(
            "authentication as {:?} with {} failed (error {}): {}",
            credentials.username,
            credentials.mechanism.as_str(),
            response.error_code,
            response.error_message.as_deref().unwrap_or("no message")
        );
    }
    Ok(response)
}

fn nonce() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow!("no randomness for the SCRAM nonce"))?;
    Ok(BASE64.encode(bytes))
}

/// Iteration counts above this are refused with an error naming it: Kafka itself allows at most
/// 16384 (`ScramMechanism.maxIterations`), so a server asking for more is not a Kafka broker
/// keyward should trust, and must not make keyward derive keys for seconds.
pub const MAX_ITERATIONS: u32 = 16_384;

/// What the server's first SCRAM message says.
struct ServerFirst<'m> {
    message: &'m str,
    nonce: &'m str,
    salt: Vec<u8>,
    iterations: NonZeroU32,
}

/// The client side of one SCRAM exchange.
struct Scram<'a> {
    credentials: &'a Credentials,
    client_first_bare: String,
    client_nonce: String,
    /// Known once the client's proof is computed.
    server_signature: Option<Vec<u8>>,
}

impl<'a> Scram<'a> {
    fn new(credentials: &'a Credentials, client_nonce: &str) -> Self {
        let user = credentials.username.replace('=', "=3D").replace(',', "=2C");
        Self {
            credentials,
            client_first_bare: format!("n={user},r={client_nonce}"),
            client_nonce: client_nonce.to_owned(),
            server_signature: None,
        }
    }

    fn algorithms(
        &self,
    ) -> (
        pbkdf2::Algorithm,
        hmac::Algorithm,
        &'static digest::Algorithm,
    ) {
        match self.credentials.mechanism {
            SaslMechanism::ScramSha512 => (
                pbkdf2::PBKDF2_HMAC_SHA512,
                hmac::HMAC_SHA512,
                &digest::SHA512,
            ),
            _ => (
                pbkdf2::PBKDF2_HMAC_SHA256,
                hmac::HMAC_SHA256,
                &digest::SHA256,
            ),
        }
    }

    fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Reads and checks the server's first message; nothing is derived yet.
    fn server_first<'m>(&self, server_first: &'m [u8]) -> anyhow::Result<ServerFirst<'m>> {
        let message =
            std::str::from_utf8(server_first).context("the server's first SCRAM message")?;
        let attr = |name: char| {
            message
                .split(',')
                .find_map(|a| a.strip_prefix(name).and_then(|a| a.strip_prefix('=')))
                .ok_or_else(|| anyhow!("the server's first SCRAM message has no {name}="))
        };
        let nonce = attr('r')?;
        ensure!(
            nonce.starts_with(&self.client_nonce) && nonce.len() > self.client_nonce.len(),
            "the server's SCRAM nonce does not extend keyward's"
        );
        let salt = BASE64.decode(attr('s')?).context("the SCRAM salt")?;
        let iterations: u32 = attr('i')?.parse().context("the SCRAM iteration count")?;
        let iterations = NonZeroU32::new(iterations)
            .filter(|i| i.get() <= MAX_ITERATIONS)
            .ok_or_else(|| {
                anyhow!(
                    "the server asks for {iterations} SCRAM iterations; keyward accepts 1 to {MAX_ITERATIONS}, Kafka's own limit"
                )
            })?;
        Ok(ServerFirst {
            message,
            nonce,
            salt,
            iterations,
        })
    }

    /// The client's final message for `server_first`, with the key derivation (PBKDF2, up to
    /// [`MAX_ITERATIONS`] rounds: milliseconds of CPU) run on tokio's blocking pool, off the
    /// workers that move client traffic.
    async fn client_final_off_runtime(&mut self, server_first: &[u8]) -> anyhow::Result<String> {
        let first = self.server_first(server_first)?;
        let (kdf, _, hash) = self.algorithms();
        let password = self.credentials.password.clone();
        let salt = first.salt.clone();
        let iterations = first.iterations;
        let salted = tokio::task::spawn_blocking(move || {
            salt_password(kdf, hash, iterations, &salt, &password)
        })
        .await
        .context("deriving the SCRAM key")?;
        Ok(self.prove(&first, &salted))
    }

    /// The same, derived on the calling thread (tests).
    #[cfg(test)]
    fn client_final(&mut self, server_first: &[u8]) -> anyhow::Result<String> {
        let first = self.server_first(server_first)?;
        let (kdf, _, hash) = self.algorithms();
        let salted = salt_password(
            kdf,
            hash,
            first.iterations,
            &first.salt,
            &self.credentials.password,
        );
        Ok(self.prove(&first, &salted))
    }

    /// The client's proof over the exchange, from the salted password; remembers the
    /// signature the server must answer with.
    fn prove(&mut self, first: &ServerFirst<'_>, salted: &[u8]) -> String {
        let (_, mac, hash) = self.algorithms();
        let salted = hmac::Key::new(mac, salted);
        let client_key = hmac::sign(&salted, b"Client Key");
        let stored_key = digest::digest(hash, client_key.as_ref());
        let without_proof = format!("c=biws,r={}", first.nonce);
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, first.message
        );
        let signature = hmac::sign(
            &hmac::Key::new(mac, stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(signature.as_ref())
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac::sign(&salted, b"Server Key");
        self.server_signature = Some(
            hmac::sign(
                &hmac::Key::new(mac, server_key.as_ref()),
                auth_message.as_bytes(),
            )
            .as_ref()
            .to_vec(),
        );
        format!("{without_proof},p={}", BASE64.encode(proof))
    }

    /// Checks the server knew the password too: its signature over the exchange.
    fn verify_server(&self, server_final: &[u8]) -> anyhow::Result<()> {
        let server_final =
            std::str::from_utf8(server_final).context("the server's final SCRAM message")?;
        if let Some(e) = server_final.strip_prefix("e=") {
            bail!("the broker refused the SCRAM proof: {e}");
        }
        let verifier = server_final
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .ok_or_else(|| anyhow!("the server's final SCRAM message has no v="))?;
        let expected = self
            .server_signature
            .as_deref()
            .ok_or_else(|| anyhow!("SCRAM messages out of order"))?;
        ensure!(
            BASE64.decode(verifier).ok().as_deref() == Some(expected),
            "the broker's SCRAM signature is wrong: it does not know keyward's password"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(mechanism: SaslMechanism, user: &str, password: &str) -> Credentials {
        Credentials {
            mechanism,
            username: user.to_owned(),
            password: Secret::new(password.to_owned()),
        }
    }

    /// RFC 7677, section 3.
    #[test]
    fn scram_sha_256_matches_the_rfc_example() {
        let c = credentials(SaslMechanism::ScramSha256, "user", "pencil");
        let mut scram = Scram::new(&c, "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(scram.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        assert_eq!(
            scram.client_final(server_first).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        scram
            .verify_server(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        let e = scram
            .verify_server(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap_err();
        assert!(e.to_string().contains("signature is wrong"), "{e}");
    }

    #[test]
    fn hostile_server_messages_are_refused() {
        let c = credentials(SaslMechanism::ScramSha512, "a=b,c", "pw");
        let mut scram = Scram::new(&c, "abc");
        assert_eq!(scram.client_first(), "n,,n=a=3Db=2Cc,r=abc");
        for (bad, why) in [
            (&b"r=xyz123,s=AAAA,i=4096"[..], "does not extend"),
            (b"r=abc,s=AAAA,i=4096", "does not extend"),
            (b"r=abcdef,s=AAAA,i=0", "0 SCRAM iterations"),
            (b"r=abcdef,s=AAAA,i=4000000000", "iterations"),
            (
                b"r=abcdef,s=AAAA,i=16385",
                "asks for 16385 SCRAM iterations; keyward accepts 1 to 16384, Kafka's own limit",
            ),
            (b"r=abcdef,i=4096", "no s="),
            (b"\xff", "first SCRAM message"),
        ] {
            let e = scram.client_final(bad).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{e:#} should say {why}");
        }
        assert!(
            scram
                .verify_server(b"e=invalid-proof")
                .unwrap_err()
                .to_string()
                .contains("refused the SCRAM proof")
        );
    }

    /// Kafka's own ceiling is accepted, and the exchange with it gives the same proof whether
    /// the key is derived on the blocking pool or here.
    #[tokio::test(flavor = "current_thread")]
    async fn the_key_is_derived_off_the_runtime_up_to_kafkas_limit() {
        let c = credentials(SaslMechanism::ScramSha512, "keyward", "secret");
        let server_first = b"r=abcdefXYZ,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=16384";
        let mut here = Scram::new(&c, "abcdef");
        let expected = here.client_final(server_first).unwrap();

        // On a current-thread runtime, a derivation on the worker would block this task: the
        // ticker below could not run until it finished. Off the runtime, it ticks meanwhile.
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        });
        let mut off = Scram::new(&c, "abcdef");
        let got = off.client_final_off_runtime(server_first).await.unwrap();
        ticker.abort();
        assert_eq!(got, expected);
        assert!(
            ticks.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "the runtime kept running while the key was derived"
        );
        assert_eq!(off.server_signature, here.server_signature);
    }
}
