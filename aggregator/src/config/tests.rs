//! The parser's tests: every variable, default, range and error line.
use super::*;
use std::collections::HashMap;

fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut map: HashMap<String, String> = HashMap::from([
        (
            "DATABASE_URL".to_string(),
            "postgres://u:secretpw@db:5432/votes".to_string(),
        ),
        (
            "AMQP_URL".to_string(),
            "amqp://u:secretpw@mq:5672/%2f".to_string(),
        ),
    ]);
    for (k, v) in pairs {
        if v.is_empty() {
            map.remove(*k);
        } else {
            map.insert(k.to_string(), v.to_string());
        }
    }
    Config::from_lookup(|k| map.get(k).cloned())
}

fn err(pairs: &[(&str, &str)]) -> String {
    parse(pairs)
        .expect_err("config should be rejected")
        .to_string()
}

#[test]
fn defaults_match_the_documented_table() {
    let c = parse(&[]).expect("defaults");
    assert_eq!(c.queue_name, "votes.aggregation");
    assert_eq!(c.dead_letter_queue(), "votes.aggregation.dlq");
    assert_eq!(c.queue_type, QueueType::Quorum);
    assert_eq!(c.batch_size, 500);
    assert_eq!(c.batch_timeout, Duration::from_millis(50));
    assert_eq!(c.prefetch_count, 1000);
    assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:8001");
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(c.run_migrations);
}

/// Every literal default in [`VARIABLES`] (hence in the README and `--help`) is what
/// the parser applies when the variable is unset.
#[test]
fn the_table_s_defaults_are_the_parser_s() {
    let unset = format!("{:?}", parse(&[]).expect("defaults"));
    for v in VARIABLES {
        if let variables::DefaultValue::Value(value) = v.default {
            let set = format!("{:?}", parse(&[(v.name, value)]).expect("default is valid"));
            assert_eq!(set, unset, "{}={value} is not the parser's default", v.name);
        }
    }
}

#[test]
fn bad_numbers_name_the_variable_value_and_range() {
    let e = err(&[("BATCH_SIZE", "abc")]);
    assert_eq!(
        e,
        "invalid BATCH_SIZE=\"abc\": expected a whole number from 1 to 10000"
    );
    assert!(!e.contains('\n'));
    let e = err(&[("BATCH_TIMEOUT_MS", "0")]);
    assert!(e.starts_with("invalid BATCH_TIMEOUT_MS=\"0\""), "{e}");
}

#[test]
fn enums_list_what_is_allowed() {
    assert_eq!(
        err(&[("QUEUE_TYPE", "stream")]),
        "invalid QUEUE_TYPE=\"stream\": expected 'quorum' or 'classic'"
    );
    assert_eq!(
        err(&[("LOG_FORMAT", "xml")]),
        "invalid LOG_FORMAT=\"xml\": expected 'text' or 'json'"
    );
    assert!(err(&[("METRICS_ADDR", "localhost")]).starts_with("invalid METRICS_ADDR"));
}

#[test]
fn prefetch_below_batch_size_is_rejected() {
    let e = err(&[("BATCH_SIZE", "500"), ("PREFETCH_COUNT", "100")]);
    assert!(e.starts_with("invalid PREFETCH_COUNT=\"100\""), "{e}");
    let c = parse(&[("BATCH_SIZE", "100")]).expect("valid");
    assert_eq!(c.prefetch_count, 200, "prefetch defaults to 2x batch");
}

#[test]
fn urls_are_required_once_and_never_echo_the_password() {
    assert_eq!(
        err(&[("DATABASE_URL", "")]),
        "DATABASE_URL is not set: set DATABASE_URL or DATABASE_URL_FILE"
    );
    assert_eq!(
        err(&[("AMQP_URL_FILE", "/run/secrets/amqp")]),
        "both AMQP_URL and AMQP_URL_FILE are set: set only one"
    );
    let e = err(&[("DATABASE_URL", "mysql://u:secretpw@db/votes")]);
    assert!(e.starts_with("invalid DATABASE_URL="), "{e}");
    assert!(!e.contains("secretpw"), "password leaked: {e}");
    assert!(e.contains("***"), "{e}");
}

#[test]
fn url_file_is_read_and_a_missing_file_is_named() {
    let dir = std::env::temp_dir().join(format!("va-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("db_url");
    std::fs::write(&path, "postgres://u:pw@filehost/votes\n").expect("write");
    let c = parse(&[
        ("DATABASE_URL", ""),
        ("DATABASE_URL_FILE", path.to_str().expect("utf8 path")),
    ])
    .expect("valid");
    assert_eq!(
        c.database_url.expose_secret(),
        "postgres://u:pw@filehost/votes"
    );
    let e = err(&[
        ("DATABASE_URL", ""),
        ("DATABASE_URL_FILE", "/nonexistent/x"),
    ]);
    assert!(
        e.starts_with("cannot read DATABASE_URL_FILE=\"/nonexistent/x\""),
        "{e}"
    );
}

#[test]
fn redaction_hides_passwords_only() {
    assert_eq!(
        redact_url("amqp://votes:hunter2@mq:5672/%2f"),
        "amqp://votes:***@mq:5672/%2f"
    );
    assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
    assert_eq!(redact_url("not a url hunter2"), "<unparseable URL hidden>");
}

#[test]
fn redaction_hides_secret_query_values() {
    let shown = redact_url(
        "postgres://db/votes?user=v&password=hunter2&sslpassword=keypw&sslmode=require&PassWord=x2",
    );
    assert!(
        !shown.contains("hunter2") && !shown.contains("keypw"),
        "{shown}"
    );
    assert!(!shown.contains("x2"), "{shown}");
    assert!(
        shown.contains("user=v") && shown.contains("sslmode=require"),
        "{shown}"
    );
    let e = err(&[("DATABASE_URL", "mysql://db/votes?password=hunter2")]);
    assert!(!e.contains("hunter2"), "{e}");
    // A password starting with '/' (unescaped) is read as a path by WHATWG parsers.
    let raw = "postgres://votes:/k3J9hunter2@db/votes#frag";
    assert!(!redact_url(raw).contains("hunter2"), "{}", redact_url(raw));
    let e = err(&[("DATABASE_URL", raw)]);
    assert!(
        !e.contains("hunter2") && e.contains("percent-encoded"),
        "{e}"
    );
    assert!(!redact_url("amqp://u:p@mq/%2f#hunter2").contains("hunter2"));
    assert!(!redact_url("postgres://votes:?hunter2@db/votes").contains("hunter2"));
    assert!(parse(&[("DATABASE_URL", "postgres://db/votes?user=me@corp")]).is_ok());
}

#[test]
fn session_timeouts_are_checked_against_each_other() {
    let c = parse(&[]).expect("defaults");
    assert!(c.db_attempt_timeout > c.db_timeouts.statement);
    let e = err(&[("DB_STATEMENT_TIMEOUT_MS", "30000")]);
    assert!(
        e.starts_with("invalid DB_ATTEMPT_TIMEOUT_MS=\"30000\""),
        "{e}"
    );
    let e = err(&[("DB_LOCK_TIMEOUT_MS", "20000")]);
    assert!(e.starts_with("invalid DB_LOCK_TIMEOUT_MS"), "{e}");
    let c = parse(&[
        ("DB_LOCK_TIMEOUT_MS", "1000"),
        ("DB_ATTEMPT_TIMEOUT_MS", "15000"),
    ])
    .expect("valid");
    assert_eq!(c.db_timeouts.lock, Duration::from_millis(1000));
    assert_eq!(c.db_attempt_timeout, Duration::from_millis(15000));
}

/// The defaults the README and `--help` state are the parser's: setting a variable to its
/// documented default gives the same configuration as leaving it unset.
#[test]
fn every_documented_default_is_the_parsers_default() {
    let unset = format!("{:?}", parse(&[]).expect("defaults parse"));
    let mut checked = 0;
    for var in VARIABLES {
        let variables::DefaultValue::Value(value) = var.default else {
            continue;
        };
        let set = parse(&[(var.name, value)])
            .unwrap_or_else(|e| panic!("{}={value:?} (its documented default): {e}", var.name));
        assert_eq!(format!("{set:?}"), unset, "{}={value:?}", var.name);
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} literal defaults checked");
}

#[test]
fn tally_check_interval_zero_turns_the_check_off() {
    let on = parse(&[("TALLY_CHECK_INTERVAL_SECONDS", "60")]).expect("valid");
    assert_eq!(on.tally_check_interval, Some(Duration::from_secs(60)));
    let off = parse(&[("TALLY_CHECK_INTERVAL_SECONDS", "0")]).expect("valid");
    assert_eq!(off.tally_check_interval, None);
    let e = err(&[("TALLY_CHECK_INTERVAL_SECONDS", "86401")]);
    assert!(
        e.starts_with("invalid TALLY_CHECK_INTERVAL_SECONDS=\"86401\""),
        "{e}"
    );
}

#[test]
fn amqp_url_may_list_the_nodes_of_a_cluster() {
    let list = "amqp://u:pw1@mq-1:5672/%2f, amqp://u:pw2@mq-2:5672/%2f,amqp://u:pw3@mq-3/%2f";
    let c = parse(&[("AMQP_URL", list)]).expect("a list of nodes");
    let nodes: Vec<String> = node_urls(&c.amqp_url)
        .iter()
        .map(|n| n.expose_secret().to_string())
        .collect();
    assert_eq!(
        nodes,
        [
            "amqp://u:pw1@mq-1:5672/%2f",
            "amqp://u:pw2@mq-2:5672/%2f",
            "amqp://u:pw3@mq-3/%2f"
        ]
    );
    // One URL is a list of one: unchanged.
    let one = parse(&[]).expect("one node");
    assert_eq!(node_urls(&one.amqp_url).len(), 1);
    // The file variant takes the same list.
    let dir = std::env::temp_dir().join(format!("va-config-nodes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("amqp_url");
    std::fs::write(&path, format!("{list}\n")).expect("write");
    let c = parse(&[
        ("AMQP_URL", ""),
        ("AMQP_URL_FILE", path.to_str().expect("utf8 path")),
    ])
    .expect("a list from a file");
    assert_eq!(node_urls(&c.amqp_url).len(), 3);
}

#[test]
fn a_bad_node_in_the_list_is_one_line_with_every_url_redacted() {
    let e = err(&[("AMQP_URL", "amqp://u:pw1@mq-1/%2f,http://u:pw2@mq-2/%2f")]);
    assert_eq!(
        e,
        "invalid AMQP_URL=\"http://u:***@mq-2/%2f\": expected a URL of scheme amqp or amqps with a host",
        "{e}"
    );
    let e = err(&[("AMQP_URL", "amqp://u:pw1@mq-1/%2f,amqps://u:pw2@mq-2/%2f")]);
    assert!(e.contains("mixes schemes"), "{e}");
    assert!(
        e.contains("amqp://u:***@mq-1/%2f") && e.contains("amqps://u:***@mq-2/%2f"),
        "{e}"
    );
    assert!(
        !e.contains("pw1") && !e.contains("pw2") && !e.contains('\n'),
        "{e}"
    );
    let e = err(&[("AMQP_URL", "amqp://u:pw@mq-1/%2f,amqp://u:pw@mq-1/%2f")]);
    assert!(e.contains("listed twice") && !e.contains("pw@"), "{e}");
    // The same node with the default port written out, or another user: still one node.
    let e = err(&[("AMQP_URL", "amqp://u:pw@mq-1/%2f,amqp://v:pw@mq-1:5672/%2f")]);
    assert!(e.contains("listed twice") && !e.contains("pw@"), "{e}");
    // A comma inside a password splits the URL: the piece fails the check, hidden.
    let e = err(&[("AMQP_URL", "amqp://u:p,w@mq-1/%2f")]);
    assert!(e.starts_with("invalid AMQP_URL="), "{e}");
    assert!(!e.contains("p,w") && !e.contains("w@mq"), "{e}");
    assert_eq!(
        err(&[("AMQP_URL", " , ")]),
        "AMQP_URL is not set: set AMQP_URL or AMQP_URL_FILE"
    );
}
