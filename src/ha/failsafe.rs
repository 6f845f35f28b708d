//! Authentication of the failsafe request.
//!
//! A primary cut off from the API server asks its members for a promise not to compete for the
//! Lease (see `elector`). A promise blocks failover for a lease duration, so it is given only
//! to a request that proves it comes from a member of the cluster: an HMAC-SHA256, keyed with
//! the replication role's password (a Secret every instance of the cluster already reads), of
//! the cluster, the primary's name and the current 30-second window of the wall clock. Nobody
//! without that Secret can make members promise, a token for one primary does not work for
//! another, and a token seen on the wire (plain HTTP while TLS is off) is worthless a minute
//! later. Members accept the window before and after their own, so clocks may differ by up to
//! half a minute; more than that (an unsynchronised node) makes the promise fail, which fences
//! the cut-off primary: the safe side.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The request header carrying the token.
pub const HEADER: &str = "x-pgwarden-failsafe";

/// The length of a token's time window.
const WINDOW_SECONDS: u64 = 30;

fn window(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / WINDOW_SECONDS)
}

fn mac(password: &str, cluster: &str, primary: &str, window: u64) -> Option<Hmac<Sha256>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(password.as_bytes()).ok()?;
    // Length-prefixed, so that no two (cluster, primary, window) sign the same bytes.
    let window = window.to_string();
    for part in ["pgwarden failsafe v2", cluster, primary, window.as_str()] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part.as_bytes());
    }
    Some(mac)
}

/// The token `primary` sends with its failsafe request at `now` (hex).
pub fn token(password: &str, cluster: &str, primary: &str, now: SystemTime) -> String {
    mac(password, cluster, primary, window(now))
        .map(|m| {
            m.finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `token` is `primary`'s, made in the window of `now` or the one before or after it;
/// compared in constant time.
pub fn verify(password: &str, cluster: &str, primary: &str, token: &str, now: SystemTime) -> bool {
    let Some(bytes) = decode_hex(token) else {
        return false;
    };
    let w = window(now);
    [w.saturating_sub(1), w, w + 1]
        .into_iter()
        .any(|w| mac(password, cluster, primary, w).is_some_and(|m| m.verify_slice(&bytes).is_ok()))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_proves_the_secret_the_cluster_the_primary_and_the_time() {
        let now = SystemTime::now();
        let t = token("s3cret", "pg", "pg-0", now);
        assert_eq!(t.len(), 64);
        let ok = |pw, c, p, t: &str| verify(pw, c, p, t, now);
        assert!(ok("s3cret", "pg", "pg-0", &t));
        assert!(!ok("other", "pg", "pg-0", &t), "another secret");
        assert!(!ok("s3cret", "pg", "pg-1", &t), "another primary");
        assert!(!ok("s3cret", "pgx", "pg-0", &t), "another cluster");
        assert!(!ok("s3cret", "pg", "pg-0", ""), "no token");
        assert!(!ok("s3cret", "pg", "pg-0", "zz"), "not hex");
        assert!(!ok("s3cret", "pg", "pg-0", &t[..62]), "truncated");
        // A clock half a minute off either way still agrees; a token replayed later does not.
        let secs = std::time::Duration::from_secs;
        assert!(verify("s3cret", "pg", "pg-0", &t, now + secs(30)));
        assert!(verify("s3cret", "pg", "pg-0", &t, now - secs(30)));
        assert!(!verify("s3cret", "pg", "pg-0", &t, now + secs(90)));
        assert!(!verify("s3cret", "pg", "pg-0", &t, now - secs(90)));
    }
}
