//! Tests only: the Kubernetes manifests in `deploy/k8s/` agree with the service's own
//! constants. Every variable they set is one the service reads
//! ([`crate::config::variables::VARIABLES`], which `vote-aggregator config-table` prints),
//! the container port is `METRICS_ADDR`'s default port, the pods' termination grace
//! exceeds the shutdown grace, and the probes ask the endpoint's own paths. The schemas
//! and the references between the files are `make k8s-validate`'s job.
//!
//! The YAML is read line by line (the workspace has no YAML parser and needs none for
//! this): every scan asserts that it found what it looks for, so a manifest written
//! another way fails here instead of passing unchecked.

use std::net::SocketAddr;

use crate::config::{DEFAULT_METRICS_ADDR, DEFAULT_SHUTDOWN_GRACE, variables};
use crate::http::paths;

/// A manifest of `deploy/k8s/`, by file name.
fn manifest(name: &str) -> String {
    let path = format!("{}/../deploy/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The values of every `key: value` line (list items too), quotes removed, comments skipped.
fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.trim_start().trim_start_matches("- "))
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .collect()
}

/// The single value of `key`; panics unless there is exactly one.
fn single(text: &str, key: &str) -> String {
    match values(text, key).as_slice() {
        [one] => one.clone(),
        other => panic!("expected one `{key}:` in the manifest, found {other:?}"),
    }
}

/// The names of the environment variables set (the upper-case `- name:` entries).
fn env_names(text: &str) -> Vec<String> {
    values(text, "name")
        .into_iter()
        .filter(|n| {
            n.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect()
}

/// The literal `value:` on the line after `- name: NAME`, if the variable is set so.
fn env_value(text: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let at = lines.iter().position(|l| *l == format!("- name: {name}"))?;
    let value = lines.get(at + 1)?.strip_prefix("value:")?;
    Some(value.trim().trim_matches('"').to_owned())
}

/// The `path:` of the HTTP probe that starts at the line `probe:`.
fn probe_path(text: &str, probe: &str) -> String {
    let after = text
        .split_once(&format!("{probe}:"))
        .unwrap_or_else(|| panic!("no {probe} in the manifest"))
        .1;
    values(after, "path")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no path in {probe}"))
}

#[test]
fn every_variable_the_manifests_set_is_one_the_service_reads() {
    let known: Vec<&str> = variables::VARIABLES
        .iter()
        .flat_map(|v| std::iter::once(v.name).chain(v.file_variant))
        .collect();
    for file in ["30-deployment.yaml", "20-migrate-job.yaml"] {
        let names = env_names(&manifest(file));
        assert!(
            names.iter().any(|n| n == variables::DATABASE_URL_FILE),
            "{file}: DATABASE_URL_FILE not found among {names:?}"
        );
        for name in &names {
            assert!(
                known.contains(&name.as_str()),
                "{file} sets {name}, which the service does not read (see `vote-aggregator config-table`)"
            );
        }
    }
}

#[test]
fn the_replicas_never_migrate_and_are_named_after_their_pod() {
    let deployment = manifest("30-deployment.yaml");
    assert_eq!(
        env_value(&deployment, variables::RUN_MIGRATIONS).as_deref(),
        Some("false")
    );
    assert!(
        env_names(&deployment)
            .iter()
            .any(|n| n == variables::REPLICA_ID)
    );
    assert_eq!(single(&deployment, "fieldPath"), "metadata.name");
}

#[test]
fn the_port_is_the_metrics_endpoints() {
    let port = DEFAULT_METRICS_ADDR.port().to_string();
    let deployment = manifest("30-deployment.yaml");
    assert_eq!(single(&deployment, "containerPort"), port);
    if let Some(addr) = env_value(&deployment, variables::METRICS_ADDR) {
        let addr: SocketAddr = addr.parse().expect("METRICS_ADDR in the Deployment");
        assert_eq!(
            addr.port(),
            DEFAULT_METRICS_ADDR.port(),
            "METRICS_ADDR's port"
        );
    }
    assert_eq!(single(&manifest("40-service.yaml"), "port"), port);
    let policy = values(&manifest("60-networkpolicy.yaml"), "port");
    assert!(
        policy.contains(&port),
        "the NetworkPolicy admits {policy:?}"
    );
}

#[test]
fn the_pods_termination_grace_exceeds_the_shutdown_grace() {
    let deployment = manifest("30-deployment.yaml");
    let pod_grace: u64 = single(&deployment, "terminationGracePeriodSeconds")
        .parse()
        .expect("terminationGracePeriodSeconds is a number");
    let shutdown_grace = match env_value(&deployment, variables::SHUTDOWN_GRACE_SECONDS) {
        Some(set) => set.parse().expect("SHUTDOWN_GRACE_SECONDS is a number"),
        None => DEFAULT_SHUTDOWN_GRACE.as_secs(),
    };
    assert!(
        pod_grace > shutdown_grace && pod_grace > DEFAULT_SHUTDOWN_GRACE.as_secs(),
        "terminationGracePeriodSeconds {pod_grace} must exceed the shutdown grace {shutdown_grace}"
    );
}

#[test]
fn the_probes_ask_the_endpoints_paths() {
    let deployment = manifest("30-deployment.yaml");
    assert_eq!(probe_path(&deployment, "livenessProbe"), paths::HEALTHZ);
    assert_eq!(probe_path(&deployment, "readinessProbe"), paths::READYZ);
}

#[test]
fn the_scans_read_what_they_look_for() {
    let yaml =
        "a:\n  # name: COMMENTED\n  - name: ONE\n    value: \"x\"\n  - name: lower\nport: 1\n";
    assert_eq!(env_names(yaml), ["ONE"]);
    assert_eq!(env_value(yaml, "ONE").as_deref(), Some("x"));
    assert_eq!(env_value(yaml, "TWO"), None);
    assert_eq!(single(yaml, "port"), "1");
}
