//! Authentication of the failsafe request.
//!
//! A primary cut off from the API server asks its members for a promise not to compete for the
//! Lease (see `elector`). A promise blocks failover for a lease duration, so it is given only
//! to a request that proves it comes from a member of the cluster: an HMAC-SHA256, keyed with
//! the replication role's password (a Secret every instance of the cluster already reads), of
//! the cluster and the primary's name. Nobody without that Secret can make members promise,
//! and a token for one primary does not work for another.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The request header carrying the token.
pub const HEADER: &str = "x-pgwarden-failsafe";

fn mac(password: &str, cluster: &str, primary: &str) -> Option<Hmac<Sha256>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(password.as_bytes()).ok()?;
    // Length-prefixed, so that no two (cluster, primary) pairs sign the same bytes.
    for part in ["pgwarden failsafe v1", cluster, primary] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part.as_bytes());
    }
    Some(mac)
}

/// The token `primary` sends with its failsafe request (hex).
pub fn token(password: &str, cluster: &str, primary: &str) -> String {
    mac(password, cluster, primary)
        .map(|m| {
            m.finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `token` is `primary`'s, compared in constant time.
pub fn verify(password: &str, cluster: &str, primary: &str, token: &str) -> bool {
    let Some(bytes) = decode_hex(token) else {
        return false;
    };
    mac(password, cluster, primary).is_some_and(|m| m.verify_slice(&bytes).is_ok())
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
    fn a_token_proves_the_secret_the_cluster_and_the_primary() {
        let t = token("s3cret", "pg", "pg-0");
        assert_eq!(t.len(), 64);
        assert!(verify("s3cret", "pg", "pg-0", &t));
        assert!(!verify("other", "pg", "pg-0", &t), "another secret");
        assert!(!verify("s3cret", "pg", "pg-1", &t), "another primary");
        assert!(!verify("s3cret", "pgx", "pg-0", &t), "another cluster");
        assert!(!verify("s3cret", "pg", "pg-0", ""), "no token");
        assert!(!verify("s3cret", "pg", "pg-0", "zz"), "not hex");
        assert!(!verify("s3cret", "pg", "pg-0", &t[..62]), "truncated");
    }
}
