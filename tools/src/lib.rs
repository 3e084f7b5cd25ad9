//! The operator's and tester's tool for vote-aggregator, as a library behind one binary,
//! `vote-tools`: every command runs in this process, none execs a sibling.
//!
//! Modules:
//! - [`cli`]: the command line (`publish`, `check`, `load`, `demo`, `chaos`) and what each
//!   command does with the test kit ([`vote_testkit`]) and the chaos suite ([`vote_chaos`]);
//! - [`results_cli`]: `vote-tools results`, the reference results consumer;
//! - [`demo`]: `vote-tools demo`, the whole system on one machine;
//! - [`load`] and [`load_report`]: `vote-tools load`, capacity baselines against this
//!   machine's broker and database ceilings, with the report and its chart.

pub mod chaos_cli;
pub mod cli;
pub mod demo;
pub mod deploy_cli;
pub mod load;
pub mod load_report;
pub mod results_cli;
