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
}
