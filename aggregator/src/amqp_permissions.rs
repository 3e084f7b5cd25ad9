//! The least RabbitMQ permissions (per vhost: configure, write and read regular
//! expressions over exchange and queue names) the contract needs, for the aggregator's
//! user and for a publisher's user, rendered for a votes queue name. The README lists
//! them for the default queue (a unit test keeps that copy identical); the `privileges`
//! test target proves them against a real broker, including what each user is refused.
//!
//! What RabbitMQ checks (4.0), and so why each name is there:
//! - declaring (or deleting) an exchange or a queue: configure on it; declaring a queue
//!   with `x-dead-letter-exchange`: also read on the queue and write on that exchange;
//! - binding a queue to an exchange: write on the queue, read on the exchange;
//! - publishing: write on the exchange (the default exchange is `amq.default`);
//! - consuming, `basic.get`, purging: read on the queue.
//!
//! The aggregator declares `votes.dlx`, the votes queue and its two dead-letter queues,
//! binds the dead-letter queues to `votes.dlx`, consumes the votes queue and publishes
//! dead letters to `votes.dlx`; its results relay declares the `votes.results` exchange
//! and publishes to it. A publisher only publishes to the default exchange (routing key
//! = the votes queue) with confirms, which needs no other right. A results reader
//! declares its own queues named `votes.results.reader.<name>`, binds them to
//! `votes.results` and consumes them (docs/RESULTS.md).

use crate::broker::{DEAD_LETTER_EXCHANGE, dead_letter_queue, unexplained_queue};
use crate::results::{EXCHANGE as RESULTS_EXCHANGE, READER_QUEUE_PREFIX};

/// One user's permissions on a vhost (`rabbitmqctl set_permissions -p VHOST USER
/// CONFIGURE WRITE READ`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Names the user may declare and delete.
    pub configure: String,
    /// Exchanges the user may publish to, queues it may bind.
    pub write: String,
    /// Queues it may consume, get from or purge; exchanges it may bind queues to.
    pub read: String,
}

/// A regular expression matching exactly one of `names`.
fn exactly(names: &[&str]) -> String {
    let escaped: Vec<String> = names.iter().map(|n| escape(n)).collect();
    match escaped.as_slice() {
        [] => "^$".to_owned(),
        [one] => format!("^{one}$"),
        many => format!("^({})$", many.join("|")),
    }
}

/// `name` as a regular expression matching exactly that text (RabbitMQ patterns, queue
/// names in policies).
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The aggregator's user, for the votes queue `queue`.
pub fn aggregator(queue: &str) -> Permissions {
    let dlq = dead_letter_queue(queue);
    let unexplained = unexplained_queue(queue);
    Permissions {
        configure: exactly(&[
            DEAD_LETTER_EXCHANGE,
            queue,
            &dlq,
            &unexplained,
            RESULTS_EXCHANGE,
        ]),
        write: exactly(&[DEAD_LETTER_EXCHANGE, &dlq, &unexplained, RESULTS_EXCHANGE]),
        read: exactly(&[DEAD_LETTER_EXCHANGE, queue]),
    }
}

/// A results reader's user: declares, binds and consumes its own queues
/// (`votes.results.reader.<name>`) on `votes.results`; may not publish results.
pub fn results_reader() -> Permissions {
    let queues = format!("{}.+", escape(READER_QUEUE_PREFIX));
    Permissions {
        configure: format!("^{queues}$"),
        write: format!("^{queues}$"),
        read: format!("^({}|{queues})$", escape(RESULTS_EXCHANGE)),
    }
}

/// A publisher's user: publishes to the default exchange, nothing else.
pub fn publisher() -> Permissions {
    Permissions {
        configure: exactly(&[]),
        write: exactly(&["amq.default"]),
        read: exactly(&[]),
    }
}

/// The README's permission table for `queue`, in Markdown.
pub fn markdown_table(queue: &str) -> String {
    let mut out = String::from("| user | configure | write | read |\n| --- | --- | --- | --- |\n");
    for (who, p) in [
        ("aggregator", aggregator(queue)),
        ("publisher", publisher()),
        ("results reader", results_reader()),
    ] {
        out.push_str(&format!(
            "| {who} | `{}` | `{}` | `{}` |\n",
            p.configure, p.write, p.read
        ));
    }
    out
}

/// The markers around the rendered table in README.md.
pub const README_BEGIN: &str = "<!-- amqp-permissions:begin -->";
/// See [`README_BEGIN`].
pub const README_END: &str = "<!-- amqp-permissions:end -->";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exactly_the_contracts_names() {
        let p = aggregator("votes.aggregation");
        assert_eq!(
            p.configure,
            r"^(votes\.dlx|votes\.aggregation|votes\.aggregation\.dlq|votes\.aggregation\.dlq\.unexplained|votes\.results)$"
        );
        assert_eq!(
            p.write,
            r"^(votes\.dlx|votes\.aggregation\.dlq|votes\.aggregation\.dlq\.unexplained|votes\.results)$"
        );
        let r = results_reader();
        assert_eq!(r.configure, r"^votes\.results\.reader\..+$");
        assert_eq!(r.read, r"^(votes\.results|votes\.results\.reader\..+)$");
        assert_eq!(p.read, r"^(votes\.dlx|votes\.aggregation)$");
        assert_eq!(publisher().write, r"^amq\.default$");
        assert_eq!(publisher().configure, "^$");
    }

    #[test]
    fn the_readme_holds_exactly_the_rendered_table() {
        let inside = crate::readme_between(README_BEGIN, README_END);
        assert_eq!(
            inside,
            markdown_table(crate::config::DEFAULT_QUEUE_NAME).trim_end(),
            "README.md's RabbitMQ permission table differs from amqp_permissions: update it"
        );
    }
}
