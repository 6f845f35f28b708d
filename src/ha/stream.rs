//! Why a standby does not stream, from Postgres's own recent messages: divergence (its history
//! cannot continue on the primary's, which only a rewind or a new copy cures) or trouble
//! connecting (credentials, slots, pg_hba.conf, the network), which a new copy cannot cure.

/// What the most recent telling message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trouble {
    Diverged(String),
    /// The primary no longer has the WAL this standby needs: a new copy cures it, a rewind
    /// cannot.
    WalGone(String),
    Connecting(String),
    /// Nothing telling (divergence is often said at LOG level, which the recent-problems ring
    /// does not keep): treated as divergence, as before this classification existed.
    Unknown,
}

/// Messages of the startup process and walreceiver that mean the histories differ.
const DIVERGED: &[&str] = &[
    "is not a child of this server's history",
    "is not in this server's history",
    "forked off current database system timeline",
    "is ahead of the WAL flush position",
    "of the primary is behind recovery timeline",
    "no longer on the same timeline",
];

/// Messages that mean the primary removed the WAL the standby asks for.
const WAL_GONE: &[&str] = &["has already been removed"];

/// Messages that mean the walreceiver cannot get a stream at all.
const CONNECTING: &[&str] = &[
    "could not connect to the primary server",
    "password authentication failed",
    "pg_hba.conf rejects",
    "no pg_hba.conf entry",
    "replication slot",
    "terminating walreceiver due to timeout",
];

/// Classifies `recent` (oldest first): the newest message that tells decides.
pub fn classify(recent: &[String]) -> Trouble {
    for line in recent.iter().rev() {
        // Divergence first: "could not receive data from WAL stream: ERROR: requested starting
        // point ... is ahead of the WAL flush position" is both.
        if DIVERGED.iter().any(|p| line.contains(p)) {
            return Trouble::Diverged(line.clone());
        }
        if WAL_GONE.iter().any(|p| line.contains(p)) {
            return Trouble::WalGone(line.clone());
        }
        if CONNECTING.iter().any(|p| line.contains(p)) {
            return Trouble::Connecting(line.clone());
        }
    }
    Trouble::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_newest_telling_message_decides() {
        let auth = "could not connect to the primary server: connection to server at \"10.0.0.1\", port 5432 failed: FATAL:  password authentication failed for user \"streaming_replica\"";
        let timeline = "requested timeline 3 is not a child of this server's history";
        let ahead = "could not receive data from WAL stream: ERROR:  requested starting point 0/5000000 is ahead of the WAL flush position of this server 0/4000000";
        assert_eq!(
            classify(&lines(&[timeline, auth])),
            Trouble::Connecting(auth.into())
        );
        assert_eq!(
            classify(&lines(&[auth, timeline, "checkpoint starting: time"])),
            Trouble::Diverged(timeline.into())
        );
        assert_eq!(classify(&lines(&[ahead])), Trouble::Diverged(ahead.into()));
        let history = "could not receive data from WAL stream: ERROR:  requested starting point 0/6000000 on timeline 1 is not in this server's history";
        assert_eq!(
            classify(&lines(&[auth, history])),
            Trouble::Diverged(history.into())
        );
        let slot = "could not start WAL streaming: ERROR:  replication slot \"pgwarden_pg_1\" does not exist";
        assert_eq!(classify(&lines(&[slot])), Trouble::Connecting(slot.into()));
        let gone = "could not receive data from WAL stream: ERROR:  requested WAL segment 000000020000000000000004 has already been removed";
        assert_eq!(
            classify(&lines(&[auth, gone])),
            Trouble::WalGone(gone.into())
        );
        assert_eq!(classify(&lines(&["checkpoint complete"])), Trouble::Unknown);
        assert_eq!(classify(&[]), Trouble::Unknown);
    }
}
