//! `vote-harness` binary: a placeholder until the load runner and its subcommands land.
//!
//! The library (`vote_harness`) is what the test suites use today.

fn main() {
    println!("vote-harness: no subcommands yet (load, publish and check come later)");
}
