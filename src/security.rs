//! TLS material and secrets: keyward's server certificate for clients, each cluster's CA,
//! client certificate and SASL credentials, and the admin reload token.
//!
//! Everything is read from the files (or environment variables) the static config names, at
//! start and again on every reload, all or nothing: a certificate that does not parse, a key
//! that does not match its certificate or a missing password file fails the reload, and the
//! material in force keeps serving, exactly like an invalid ownership table. New client
//! connections pick up the new material; open ones keep the session they negotiated.
//!
//! Secrets are held in [`Secret`], whose `Debug` prints nothing, and are never logged or shown
//! on the admin API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use metrics::{counter, gauge};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

use crate::config::{Cluster, ClusterTls, Config, ConfigError, ListenTls, Sasl, SaslMechanism};
use crate::reload::Trigger;

/// A password or token. `Debug` shows nothing of it; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// keyward's own SASL identity on one cluster.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Secret,
}

/// How keyward connects to one cluster.
#[derive(Debug, Default)]
pub struct ClusterSecurity {
    /// `None`: plaintext.
    pub tls: Option<Arc<ClientConfig>>,
    /// `None`: keyward's own connections do not authenticate.
    pub sasl: Option<Credentials>,
}

/// One consistent set of material, swapped whole.
struct Loaded {
    listener: Option<Arc<ServerConfig>>,
    /// When each leaf certificate keyward presents expires (Unix seconds), by metric label.
    expiries: Vec<(String, i64)>,
    clusters: HashMap<String, Arc<ClusterSecurity>>,
    reload_token: Option<Secret>,
    /// Over every byte read, so a reload that reads the same files swaps nothing.
    digest: [u8; 32],
}

pub struct Security {
    config: Config,
    current: ArcSwap<Loaded>,
    /// Serializes reloads and holds the last error until a reload succeeds.
    last_error: Mutex<Option<String>>,
}

/// What a reload of the TLS material and secrets did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Loaded,
    Unchanged,
    Failed(String),
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Loaded => "loaded",
            Outcome::Unchanged => "unchanged",
            Outcome::Failed(_) => "error",
        }
    }
}

impl Security {
    /// Reads everything at start; an error here stops keyward from starting.
    pub fn load(config: &Config) -> Result<Self, ConfigError> {
        let loaded = read_all(config)?;
        publish_expiries(&loaded.expiries);
        gauge!("keyward_tls_reload_failing").set(0.0);
        Ok(Self {
            config: config.clone(),
            current: ArcSwap::from_pointee(loaded),
            last_error: Mutex::new(None),
        })
    }

    /// Re-reads every file; swaps only a complete, valid, changed set.
    pub fn reload(&self, trigger: Trigger) -> Outcome {
        let mut last_error = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = match read_all(&self.config) {
            Err(e) => {
                error!(
                    trigger = trigger.as_str(),
                    "TLS or credential reload failed; the material in force keeps serving: {e}"
                );
                *last_error = Some(e.to_string());
                Outcome::Failed(e.to_string())
            }
            Ok(new) if new.digest == self.current.load().digest => {
                *last_error = None;
                Outcome::Unchanged
            }
            Ok(new) => {
                publish_expiries(&new.expiries);
                self.current.store(Arc::new(new));
                *last_error = None;
                info!(
                    trigger = trigger.as_str(),
                    "TLS material and credentials reloaded; new connections use them"
                );
                Outcome::Loaded
            }
        };
        counter!("keyward_tls_reloads_total", "trigger" => trigger.as_str(), "result" => outcome.as_str())
            .increment(1);
        gauge!("keyward_tls_reload_failing").set(if last_error.is_some() { 1.0 } else { 0.0 });
        outcome
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The client-facing TLS config in force, or `None` when listeners speak plaintext.
    pub fn listener(&self) -> Option<Arc<ServerConfig>> {
        self.current.load().listener.clone()
    }

    /// How to connect to cluster `name`.
    pub fn cluster(&self, name: &str) -> Arc<ClusterSecurity> {
        self.current
            .load()
            .clusters
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    pub fn reload_token(&self) -> Option<Secret> {
        self.current.load().reload_token.clone()
    }

    /// Every file the material is read from, for the reload watcher.
    pub fn files(&self) -> Vec<PathBuf> {
        let c = &self.config;
        let mut files = Vec::new();
        if let Some(t) = &c.listen.tls {
            files.extend([&t.cert, &t.key].into_iter().chain(&t.client_ca).cloned());
        }
        for cluster in c.clusters.values() {
            if let Some(t) = &cluster.tls {
                files.extend(t.ca.iter().chain(&t.cert).chain(&t.key).cloned());
            }
            if let Some(s) = &cluster.sasl {
                files.extend(s.username_file.iter().chain(&s.password_file).cloned());
            }
        }
        files.extend(c.admin.reload_token_file.iter().cloned());
        files.into_iter().map(|f| c.resolve(&f)).collect()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Exports when each certificate keyward presents expires, and warns about expired ones: a
/// rotation that did not happen shows on a dashboard before clients start failing.
fn publish_expiries(expiries: &[(String, i64)]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for (cert, not_after) in expiries {
        gauge!("keyward_tls_certificate_expiry_timestamp_seconds", "cert" => cert.clone())
            .set(*not_after as f64);
        if *not_after <= now {
            warn!(cert = %cert, "the certificate keyward presents has expired; peers will refuse it");
        }
    }
}

/// The end of a certificate's validity, in Unix seconds, if it parses as X.509.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// Reads files named by the config, keeping a digest of what it read.
struct Reader<'a> {
    config: &'a Config,
    digest: Sha256,
    expiries: Vec<(String, i64)>,
}

impl Reader<'_> {
    fn error(&self, field: &str, message: String) -> ConfigError {
        ConfigError {
            file: self.config.source.clone(),
            path: field.to_owned(),
            message,
        }
    }

    /// The file's bytes; `field` names the config field for errors.
    fn read(&mut self, field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
        let full = self.config.resolve(path);
        let bytes = std::fs::read(&full)
            .map_err(|e| self.error(field, format!("cannot read {}: {e}", full.display())))?;
        self.digest.update(field.as_bytes());
        self.digest.update((bytes.len() as u64).to_be_bytes());
        self.digest.update(&bytes);
        Ok(bytes)
    }

    /// A one-line secret from a file (trailing newline removed) or an environment variable.
    fn secret(
        &mut self,
        field: &str,
        file: Option<&Path>,
        env: Option<&str>,
    ) -> Result<String, ConfigError> {
        let value = match (file, env) {
            (Some(file), _) => {
                let bytes = self.read(field, file)?;
                String::from_utf8(bytes)
                    .map_err(|_| self.error(field, "the file is not UTF-8".into()))?
            }
            (None, Some(var)) => {
                let value = std::env::var(var).map_err(|_| {
                    self.error(
                        field,
                        format!("environment variable {var} is not set (or not UTF-8)"),
                    )
                })?;
                self.digest.update(field.as_bytes());
                self.digest.update(value.as_bytes());
                value
            }
            (None, None) => return Err(self.error(field, "no source given".into())),
        };
        let value = value.trim_end_matches(['\n', '\r']).to_owned();
        if value.is_empty() {
            return Err(self.error(field, "is empty".into()));
        }
        Ok(value)
    }

    fn certs(
        &mut self,
        field: &str,
        path: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let pem = self.read(field, path)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(field, format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(self.error(
                field,
                format!("{}: no PEM certificate in the file", path.display()),
            ));
        }
        Ok(certs)
    }

    fn key(&mut self, field: &str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
        let pem = self.read(field, path)?;
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            self.error(
                field,
                format!(
                    "{}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                    path.display()
                ),
            )
        })
    }

    /// Notes when the leaf of `chain` expires, as `cert` (a metric label).
    fn expiry(&mut self, cert: &str, chain: &[CertificateDer<'static>]) {
        if let Some(at) = chain.first().and_then(not_after) {
            self.expiries.push((cert.to_owned(), at));
        }
    }

    fn roots(&mut self, field: &str, path: &Path) -> Result<RootCertStore, ConfigError> {
        let mut roots = RootCertStore::empty();
        for cert in self.certs(field, path)? {
            roots.add(cert).map_err(|e| {
                self.error(
                    field,
                    format!("{}: not a usable CA certificate: {e}", path.display()),
                )
            })?;
        }
        Ok(roots)
    }

    fn listener(&mut self, tls: &ListenTls) -> Result<ServerConfig, ConfigError> {
        let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
            crate::config::TlsVersion::Tls12 => rustls::ALL_VERSIONS,
            crate::config::TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| self.error("listen.tls.min_version", e.to_string()))?;
        let builder = match &tls.client_ca {
            Some(ca) => {
                let roots = self.roots("listen.tls.client_ca", ca)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| self.error("listen.tls.client_ca", e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let chain = self.certs("listen.tls.cert", &tls.cert)?;
        self.expiry("listener", &chain);
        let key = self.key("listen.tls.key", &tls.key)?;
        builder.with_single_cert(chain, key).map_err(|e| {
            self.error(
                "listen.tls",
                format!("the key does not fit the certificate: {e}"),
            )
        })
    }

    fn cluster_tls(&mut self, name: &str, tls: &ClusterTls) -> Result<ClientConfig, ConfigError> {
        let field = |f: &str| format!("clusters.{name}.tls.{f}");
        let roots = match &tls.ca {
            Some(ca) => self.roots(&field("ca"), ca)?,
            None => system_roots(),
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.error(&field("ca"), e.to_string()))?
            .with_root_certificates(roots);
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                let chain = self.certs(&field("cert"), cert)?;
                self.expiry(&format!("cluster/{name}"), &chain);
                let key = self.key(&field("key"), key)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    self.error(
                        &format!("clusters.{name}.tls"),
                        format!("the key does not fit the certificate: {e}"),
                    )
                })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }

    fn credentials(&mut self, name: &str, sasl: &Sasl) -> Result<Credentials, ConfigError> {
        let field = |f: &str| format!("clusters.{name}.sasl.{f}");
        let username = match &sasl.username {
            Some(u) => u.clone(),
            None => self.secret(
                &field(if sasl.username_file.is_some() {
                    "username_file"
                } else {
                    "username_env"
                }),
                sasl.username_file.as_deref(),
                sasl.username_env.as_deref(),
            )?,
        };
        let password = self.secret(
            &field(if sasl.password_file.is_some() {
                "password_file"
            } else {
                "password_env"
            }),
            sasl.password_file.as_deref(),
            sasl.password_env.as_deref(),
        )?;
        Ok(Credentials {
            mechanism: sasl.mechanism,
            username,
            password: Secret(password),
        })
    }

    fn cluster(&mut self, name: &str, cluster: &Cluster) -> Result<ClusterSecurity, ConfigError> {
        Ok(ClusterSecurity {
            tls: match &cluster.tls {
                Some(t) => Some(Arc::new(self.cluster_tls(name, t)?)),
                None => None,
            },
            sasl: match &cluster.sasl {
                Some(s) => Some(self.credentials(name, s)?),
                None => None,
            },
        })
    }
}

fn read_all(config: &Config) -> Result<Loaded, ConfigError> {
    let mut r = Reader {
        config,
        digest: Sha256::new(),
        expiries: Vec::new(),
    };
    let listener = match &config.listen.tls {
        Some(t) => Some(Arc::new(r.listener(t)?)),
        None => None,
    };
    let mut clusters = HashMap::new();
    for (name, cluster) in &config.clusters {
        clusters.insert(name.clone(), Arc::new(r.cluster(name, cluster)?));
    }
    let reload_token = match &config.admin.reload_token_file {
        Some(f) => Some(Secret(r.secret(
            "admin.reload_token_file",
            Some(f),
            None,
        )?)),
        None => None,
    };
    Ok(Loaded {
        listener,
        expiries: r.expiries,
        clusters,
        reload_token,
        digest: r.digest.finalize().into(),
    })
}

/// The operating system's trust store, for clusters configured without a CA bundle.
fn system_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        warn!(error = %e, "reading the system's CA certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        warn!(
            added,
            ignored, "some system CA certificates could not be used"
        );
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA, and leaves it signs, in a temporary directory.
    pub struct Pki {
        pub dir: PathBuf,
        ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    impl Pki {
        pub fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "keyward-pki-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, format!("{name} CA"));
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
            Pki {
                dir,
                ca: rcgen::Issuer::new(params, key),
            }
        }

        /// Writes `<name>.pem` and `<name>-key.pem` for a leaf valid for localhost/127.0.0.1.
        pub fn leaf(&self, name: &str) -> (PathBuf, PathBuf) {
            let params =
                rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.ca).unwrap();
            let (c, k) = (
                self.dir.join(format!("{name}.pem")),
                self.dir.join(format!("{name}-key.pem")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        }
    }

    fn config(pki: &Pki, extra: &str) -> Config {
        let text = format!(
            r#"
region: eu
listen:
  bootstrap: 127.0.0.1:9192
  advertised_host: 127.0.0.1
  broker_port_base: 9193
  tls: {{ cert: proxy.pem, key: proxy-key.pem, client_ca: ca.pem }}
clusters:
  eu:
    bootstrap: ["127.0.0.1:19092"]
    tls: {{ ca: ca.pem }}
    sasl: {{ mechanism: SCRAM-SHA-512, username: keyward, password_file: eu-pass }}
  us: {{ bootstrap: ["127.0.0.1:29092"] }}
ownership_file: ownership.yaml
{extra}"#
        );
        Config::parse(&text, &pki.dir.join("keyward.yaml")).unwrap()
    }

    #[test]
    fn loads_and_reloads_all_or_nothing() {
        let pki = Pki::new("reload");
        pki.leaf("proxy");
        std::fs::write(pki.dir.join("eu-pass"), "s3cret\n").unwrap();
        let security = Security::load(&config(&pki, "")).unwrap();
        let first = security.listener().unwrap();
        let eu = security.cluster("eu");
        assert!(eu.tls.is_some());
        let creds = eu.sasl.as_ref().unwrap();
        assert_eq!(
            creds.password.expose(),
            "s3cret",
            "the newline is not part of it"
        );
        assert!(
            !format!("{creds:?}").contains("s3cret"),
            "Debug hides secrets"
        );
        assert!(security.cluster("us").tls.is_none());
        let expiries = &security.current.load().expiries;
        assert_eq!(expiries.len(), 1, "{expiries:?}");
        assert_eq!(expiries[0].0, "listener");
        assert!(expiries[0].1 > 1_700_000_000, "{expiries:?}");
        assert_eq!(security.reload(Trigger::Api), Outcome::Unchanged);

        // A key that belongs to another certificate: the old material keeps serving.
        let (_, other_key) = pki.leaf("other");
        std::fs::copy(&other_key, pki.dir.join("proxy-key.pem")).unwrap();
        match security.reload(Trigger::File) {
            Outcome::Failed(e) => assert!(e.contains("listen.tls: the key does not fit"), "{e}"),
            other => panic!("expected a failure, got {other:?}"),
        }
        assert!(Arc::ptr_eq(&first, &security.listener().unwrap()));
        assert!(security.last_error().is_some());

        // A rotated certificate and key are taken, and clear the error.
        pki.leaf("proxy");
        assert_eq!(security.reload(Trigger::Sighup), Outcome::Loaded);
        assert!(!Arc::ptr_eq(&first, &security.listener().unwrap()));
        assert!(security.last_error().is_none());

        std::fs::remove_file(pki.dir.join("eu-pass")).unwrap();
        match security.reload(Trigger::Api) {
            Outcome::Failed(e) => assert!(
                e.contains("clusters.eu.sasl.password_file: cannot read") && e.contains("eu-pass"),
                "{e}"
            ),
            other => panic!("expected a failure, got {other:?}"),
        }
        std::fs::remove_dir_all(&pki.dir).unwrap();
    }

    #[test]
    fn errors_name_the_field_and_the_file() {
        let pki = Pki::new("errors");
        pki.leaf("proxy");
        std::fs::write(pki.dir.join("eu-pass"), "pw").unwrap();
        std::fs::write(pki.dir.join("ca.pem"), "not a certificate").unwrap();
        let e = Security::load(&config(&pki, "")).err().unwrap().to_string();
        assert!(
            e.contains("listen.tls.client_ca: ca.pem: no PEM certificate in the file"),
            "{e}"
        );

        let e = Security::load(&config(
            &Pki::new("errors2"),
            "admin: { reload_token_file: token }\n",
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("listen.tls.cert: cannot read"), "{e}");
        std::fs::remove_dir_all(&pki.dir).unwrap();
    }

    #[test]
    fn secrets_come_from_the_environment_too() {
        let pki = Pki::new("env");
        pki.leaf("proxy");
        let var = format!("KEYWARD_TEST_PASSWORD_{}", std::process::id());
        let mut c = config(&pki, "");
        let sasl = c.clusters.get_mut("eu").unwrap().sasl.as_mut().unwrap();
        sasl.password_file = None;
        sasl.password_env = Some(var.clone());
        let e = Security::load(&c).err().unwrap().to_string();
        assert!(
            e.contains(&format!("environment variable {var} is not set")),
            "{e}"
        );
        // SAFETY: this test alone reads or writes this variable.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var(&var, "from-env")
        };
        let s = Security::load(&c).unwrap();
        assert_eq!(
            s.cluster("eu").sasl.as_ref().unwrap().password.expose(),
            "from-env"
        );
        std::fs::remove_dir_all(&pki.dir).unwrap();
    }
}
