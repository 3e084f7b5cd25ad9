//! The deployment files agree with the service: every variable the compose file reads is
//! documented in `.env.example`, every service variable is too, and the defaults the
//! compose file, `deploy/backup.sh` and `.env.example` state are the service's own.

use std::collections::BTreeMap;

use vote_aggregator::config::variables::{DefaultValue, VARIABLES};

fn repo_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `NAME` → default of every `${NAME:-default}` / `${NAME-default}` / `${NAME}` in `text`.
fn substitutions(text: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for (i, _) in text.match_indices("${") {
        let rest = &text[i + 2..];
        let end = rest.find('}').expect("closed substitution");
        let inner = &rest[..end];
        let (name, default) = match inner.find(['-', ':']) {
            Some(at) => (
                &inner[..at],
                Some(inner[at..].trim_start_matches(':').trim_start_matches('-')),
            ),
            None => (inner, None),
        };
        out.insert(name.to_owned(), default.map(str::to_owned));
    }
    out
}

/// `NAME` → value of every `NAME=value` or `#NAME=value` line of `.env.example`.
fn documented() -> BTreeMap<String, String> {
    repo_file(".env.example")
        .lines()
        .filter_map(|l| l.trim_start_matches('#').split_once('='))
        .filter(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        })
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

#[test]
fn every_compose_variable_is_documented_in_env_example() {
    let documented = documented();
    for name in substitutions(&repo_file("docker-compose.yml")).keys() {
        assert!(
            documented.contains_key(name),
            "{name} is not in .env.example"
        );
    }
}

#[test]
fn backup_settings_are_documented_with_their_defaults() {
    let documented = documented();
    let script = substitutions(&repo_file("deploy/backup.sh"));
    for name in ["BACKUP_DIR", "BACKUP_KEEP"] {
        let default = script.get(name).cloned().flatten();
        assert!(
            default.is_some(),
            "deploy/backup.sh has no default for {name}"
        );
        assert_eq!(
            documented.get(name),
            default.as_ref(),
            "{name}: .env.example and deploy/backup.sh disagree"
        );
    }
}

#[test]
fn every_service_variable_is_documented_with_its_default() {
    let documented = documented();
    for v in VARIABLES {
        let names = std::iter::once(v.name).chain(v.file_variant);
        for name in names {
            assert!(
                documented.contains_key(name),
                "{name} is not in .env.example"
            );
        }
        if let DefaultValue::Value(default) = v.default {
            assert_eq!(documented[v.name], default, "{} in .env.example", v.name);
        }
    }
}

#[test]
fn compose_defaults_are_the_service_defaults() {
    let compose = substitutions(&repo_file("docker-compose.yml"));
    for v in VARIABLES {
        if let (Some(Some(stated)), DefaultValue::Value(default)) = (compose.get(v.name), v.default)
        {
            assert_eq!(
                stated, default,
                "docker-compose.yml's default of {}",
                v.name
            );
        }
    }
    let compose = repo_file("docker-compose.yml");
    assert!(
        compose.contains("RUN_MIGRATIONS: \"false\""),
        "replicas must not migrate"
    );
}

#[test]
fn substitutions_read_all_three_forms() {
    let s = substitutions("a ${A:-x} b ${B-} c ${C} ${D:-127.0.0.1}");
    assert_eq!(s["A"].as_deref(), Some("x"));
    assert_eq!(s["B"].as_deref(), Some(""));
    assert_eq!(s["C"], None);
    assert_eq!(s["D"].as_deref(), Some("127.0.0.1"));
}

#[test]
fn replicas_are_given_longer_to_stop_than_their_shutdown_grace() {
    use vote_aggregator::config::DEFAULT_SHUTDOWN_GRACE;
    let compose = substitutions(&repo_file("docker-compose.yml"));
    let stated = compose["AGGREGATOR_STOP_GRACE"]
        .as_deref()
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("AGGREGATOR_STOP_GRACE has a default in seconds");
    assert_eq!(
        std::time::Duration::from_secs(stated),
        super::stack::STOP_TIMEOUT,
        "the test stops replicas as compose does"
    );
    assert!(super::stack::STOP_TIMEOUT > DEFAULT_SHUTDOWN_GRACE);
    assert_eq!(
        documented()["AGGREGATOR_STOP_GRACE"],
        format!("{stated}s"),
        ".env.example"
    );
}
