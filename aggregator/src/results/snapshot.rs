//! A PostgreSQL snapshot (`pg_snapshot` text `xmin:xmax:xip,...`) and the one question a
//! results consumer asks of it: does it see this (committed) transaction? The same
//! answer as the server's `pg_visible_in_snapshot(xid, snapshot)`, computed locally so a
//! consumer need not ask the database per event.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Which transactions a snapshot sees.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Every transaction below this had ended when the snapshot was taken.
    pub xmin: u64,
    /// No transaction from this one on had ended.
    pub xmax: u64,
    /// Transactions in `[xmin, xmax)` still running then.
    pub xip: BTreeSet<u64>,
}

impl Snapshot {
    /// Whether the snapshot sees the effects of transaction `xid`, which committed: it
    /// had ended (below `xmax`) and was not among the running ones. (For an aborted
    /// transaction the answer would be meaningless; results events only exist for
    /// committed ones.)
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

impl FromStr for Snapshot {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a pg_snapshot (xmin:xmax:xip,...)");
        let mut parts = s.trim().splitn(3, ':');
        let num = |p: Option<&str>| p.and_then(|p| p.parse::<u64>().ok()).ok_or_else(bad);
        let xmin = num(parts.next())?;
        let xmax = num(parts.next())?;
        let xip = match parts.next() {
            None | Some("") => BTreeSet::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse::<u64>().map_err(|_| bad()))
                .collect::<Result<_, _>>()?,
        };
        if xmin > xmax {
            return Err(bad());
        }
        Ok(Snapshot { xmin, xmax, xip })
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let xip: Vec<String> = self.xip.iter().map(ToString::to_string).collect();
        write!(f, "{}:{}:{}", self.xmin, self.xmax, xip.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_follows_pg_visible_in_snapshot() {
        let s: Snapshot = "100:105:101,103".parse().expect("snapshot");
        assert_eq!(s.to_string(), "100:105:101,103");
        for (xid, seen) in [
            (99, true),
            (100, true),
            (101, false),
            (102, true),
            (103, false),
            (104, true),
            (105, false),
            (200, false),
        ] {
            assert_eq!(s.sees(xid), seen, "xid {xid}");
        }
        let empty: Snapshot = "740:740:".parse().expect("no xip");
        assert!(empty.sees(739) && !empty.sees(740));
        assert!("x".parse::<Snapshot>().is_err());
        assert!("5:4:".parse::<Snapshot>().is_err());
    }
}
