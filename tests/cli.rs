//! The `keyward` command line, run as operators run it: `check` and `owner` against the example
//! configs under `config/`, and against broken copies of them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn keyward(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .output()
        .expect("run keyward")
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
        .display()
        .to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A copy of the example configs in a fresh directory, with `edit` applied to the table.
fn broken_copy(test: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyward-cli-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(example("keyward.yaml"), dir.join("keyward.yaml")).unwrap();
    let table = std::fs::read_to_string(example("ownership.yaml")).unwrap();
    std::fs::write(dir.join("ownership.yaml"), edit(table)).unwrap();
    dir.join("keyward.yaml")
}

#[test]
fn check_accepts_every_example_config_and_summarises_it() {
    for config in ["keyward.yaml", "keyward-us.yaml"] {
        let out = keyward(&["check", "--config", &example(config)]);
        assert!(out.status.success(), "{config}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("regions: eu, us"), "{text}");
        assert!(text.contains("slots 16: eu 8, us 8"), "{text}");
        assert!(
            text.contains("key part 0 split by \"|\": values eu 2, us 1"),
            "{text}"
        );
    }
}

#[test]
fn check_names_file_field_and_problem() {
    let config = broken_copy("overlap", |t| {
        t.replace(r#"us: ["8-15"]"#, r#"us: ["7-15"]"#)
    });
    let out = keyward(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let table = config.with_file_name("ownership.yaml");
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "{}: rules[0].owners.us: slot 7 is also owned by eu",
            table.display()
        )
    );

    let config = broken_copy("on-foreign", |t| {
        t.replacen("on_foreign: reject", "on_foreign: forward", 1)
    });
    let out = keyward(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("rules[0].on_foreign: unknown variant `forward`"),
        "{}",
        stderr(&out)
    );

    let out = keyward(&["check", "--config", "/nonexistent/keyward.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("/nonexistent/keyward.yaml: cannot read"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn owner_answers_in_one_line() {
    let eu = example("keyward.yaml");
    let ask = |args: &[&str]| {
        let mut all = vec!["owner", "--config", &eu];
        all.extend_from_slice(args);
        let out = keyward(&all);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    // "21" hashes to murmur2 -973932308 (Kafka's own test vector): positive 1173551340, slot 12.
    assert_eq!(
        ask(&["--topic", "orders", "--key", "21"]),
        "region=us rule=orders slot=12"
    );
    assert_eq!(
        ask(&["--topic", "tenant.x", "--header", "tenant=acme"]),
        "region=eu rule=tenants slot=-"
    );
    assert_eq!(
        ask(&["--topic", "inventory", "--partition", "7"]),
        "region=us rule=inventory slot=-"
    );
    assert_eq!(
        ask(&["--topic", "metrics.cpu"]),
        "region=any rule=telemetry slot=-"
    );
    assert_eq!(
        ask(&["--topic", "orders", "--null-key"]),
        "decision=reject reason=null_key rule=orders"
    );
    assert_eq!(
        ask(&["--topic", "unlisted"]),
        "region=any rule=- slot=- default=allow"
    );
    assert_eq!(
        ask(&["--topic", "accounts.eu", "--key", "tenant-7|order-9"]),
        "region=us rule=accounts slot=-"
    );
    assert_eq!(
        ask(&["--topic", "accounts.eu", "--key", "tenant-9|order-9"]),
        "decision=reject reason=unmatched_key_part rule=accounts"
    );
    // The admin API's header form, read by the same parser.
    assert_eq!(
        ask(&["--topic", "tenant.x", "--header", "tenant:initech"]),
        "region=us rule=tenants slot=-"
    );
}

#[test]
fn owner_refuses_a_query_it_cannot_read_as_a_usage_error() {
    let eu = example("keyward.yaml");
    for (args, message) in [
        (
            ["--topic", "tenant.x", "--header", "tenant"],
            "keyward owner: header takes NAME=VALUE, got \"tenant\"",
        ),
        (
            ["--topic", "inventory", "--partition", "seven"],
            "keyward owner: partition takes a number, got \"seven\"",
        ),
    ] {
        let mut all = vec!["owner", "--config", &eu];
        all.extend_from_slice(&args);
        let out = keyward(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(stderr(&out).trim(), message);
    }
}

/// A copy of `keyward-tls.yaml` with every certificate, key and secret it names, issued by
/// throwaway CAs.
fn tls_copy(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyward-cli-{test}-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    std::fs::copy(example("keyward-tls.yaml"), dir.join("keyward.yaml")).unwrap();
    std::fs::copy(example("ownership.yaml"), dir.join("ownership.yaml")).unwrap();
    let ca = |name: &str| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("certs/{name}.pem")), cert.pem()).unwrap();
        rcgen::Issuer::new(params, key)
    };
    let leaf = |issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, name: &str| {
        let params =
            rcgen::CertificateParams::new(vec!["keyward-eu.example.internal".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        std::fs::write(dir.join(format!("certs/{name}.pem")), cert.pem()).unwrap();
        std::fs::write(
            dir.join(format!("certs/{name}-key.pem")),
            key.serialize_pem(),
        )
        .unwrap();
    };
    let proxy_ca = ca("clients-ca");
    leaf(&proxy_ca, "proxy");
    leaf(&ca("eu-ca"), "keyward-eu");
    ca("us-ca");
    std::fs::write(dir.join("secrets/eu-password"), "eu-secret\n").unwrap();
    std::fs::write(dir.join("secrets/admin-token"), "token\n").unwrap();
    dir.join("keyward.yaml")
}

#[test]
fn check_reads_every_certificate_key_and_secret_the_tls_example_names() {
    let config = tls_copy("tls");
    let run = |password: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
        cmd.args(["check", "--config", config.to_str().unwrap()]);
        cmd.env_remove("KEYWARD_US_PASSWORD");
        if let Some(p) = password {
            cmd.env("KEYWARD_US_PASSWORD", p);
        }
        cmd.output().unwrap()
    };
    let out = run(Some("us-secret"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("client listeners speak TLS"),
        "{}",
        stdout(&out)
    );
    assert!(
        !stdout(&out).contains("secret"),
        "secrets are never printed"
    );

    let out = run(None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "{}: clusters.us.sasl.password_env: environment variable KEYWARD_US_PASSWORD is not set (or not UTF-8)",
            config.display()
        )
    );

    let dir = config.parent().unwrap();
    std::fs::copy(
        dir.join("certs/keyward-eu-key.pem"),
        dir.join("certs/proxy-key.pem"),
    )
    .unwrap();
    let out = run(Some("us-secret"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("listen.tls: the key does not fit the certificate"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A copy of the example configs in a fresh directory, with `edit` applied to keyward.yaml.
fn config_copy(test: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyward-cli-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = std::fs::read_to_string(example("keyward.yaml")).unwrap();
    let edited = edit(config.clone());
    assert_ne!(edited, config, "{test}: the edit changed nothing");
    std::fs::write(dir.join("keyward.yaml"), edited).unwrap();
    std::fs::copy(example("ownership.yaml"), dir.join("ownership.yaml")).unwrap();
    dir.join("keyward.yaml")
}

#[test]
fn check_refuses_a_bootstrap_entry_holding_a_list_and_names_the_fix() {
    let config = config_copy("bootstrap-list", |c| {
        c.replace(r#"["127.0.0.1:19092"]"#, r#"["h1:9092,h2:9092"]"#)
    });
    let out = keyward(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "{}: clusters.eu.bootstrap[0]: \"h1:9092,h2:9092\" holds a list; write each address as its own entry: [h1:9092, h2:9092]",
            config.display()
        )
    );

    let config = config_copy("bootstrap-port", |c| {
        c.replace(r#"["127.0.0.1:29092"]"#, r#"["kafka-us:http"]"#)
    });
    let out = keyward(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "{}: clusters.us.bootstrap[0]: \"kafka-us:http\": port \"http\" is not a number from 1 to 65535",
            config.display()
        )
    );
}

#[test]
fn an_admin_listener_off_loopback_needs_a_reload_token_to_start() {
    let open = config_copy("admin-open", |c| {
        c.replace("listen: 127.0.0.1:9190", "listen: 0.0.0.0:9190")
    });
    let expected = format!(
        "{}: admin.listen: 0.0.0.0:9190 is not a loopback address and admin.reload_token_file is not set, so anyone who reaches it could POST /reload; set admin.reload_token_file, listen on 127.0.0.1, or set admin.allow_unauthenticated_reload: true",
        open.display()
    );
    for command in ["check", "run"] {
        let out = keyward(&[command, "--config", open.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "keyward {command}");
        assert!(
            stderr(&out).contains(&expected),
            "keyward {command}: {}",
            stderr(&out)
        );
    }

    let explicit = config_copy("admin-explicit", |c| {
        c.replace(
            "listen: 127.0.0.1:9190",
            "listen: 0.0.0.0:9190\n  allow_unauthenticated_reload: true",
        )
    });
    let out = keyward(&["check", "--config", explicit.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `check --clusters` against clusters it cannot reach: the config is valid, so the check
/// passes, and each cluster it could not ask is a warning saying its topics were not checked.
#[test]
fn check_clusters_warns_about_an_unreachable_cluster_without_failing() {
    let closed = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = broken_copy("clusters", |t| t);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:19092", &format!("127.0.0.1:{}", closed()))
        .replace("127.0.0.1:29092", &format!("127.0.0.1:{}", closed()));
    std::fs::write(&config, text).unwrap();
    let out = keyward(&["check", "--config", config.to_str().unwrap(), "--clusters"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ownership table"), "{text}");
    for cluster in ["eu", "us"] {
        assert!(
            text.contains(&format!(
                "warning: cluster {cluster} cannot be reached (connecting to 127.0.0.1:"
            )) && text.contains("its topics were not checked"),
            "{text}"
        );
    }
}

#[test]
fn version_names_the_release_and_the_commit() {
    for flag in ["--version", "-V"] {
        let out = keyward(&[flag]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let commit = text
            .strip_prefix(&format!("keyward {} (commit ", env!("CARGO_PKG_VERSION")))
            .and_then(|rest| rest.strip_suffix(")\n"))
            .unwrap_or_else(|| panic!("{flag}: {text:?}"));
        assert_eq!(commit, keyward::COMMIT, "{text}");
        assert!(
            commit == "unknown" || commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{text}"
        );
    }
}
