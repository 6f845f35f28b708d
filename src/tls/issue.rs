//! Certificates, without I/O: the cluster CA, an instance's serving certificate, the names it
//! is valid for, and when to renew it.
//!
//! Keys are ECDSA P-256 (what cert-manager issues by default and every libpq and rustls
//! accepts). The CA signs with the key from its Secret whatever created it (another instance
//! or cert-manager): the issuer is read from the CA certificate itself.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};

/// A cluster CA lives for ten years; instances re-issue their own certificates long before.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// An instance's serving certificate lives 90 days and is renewed after two thirds of that.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Clocks of the nodes differ: a certificate is valid from a little before it was issued.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("cannot generate a key: {0}")]
    Key(rcgen::Error),
    #[error("the CA certificate or key cannot be used: {0}")]
    Ca(rcgen::Error),
    #[error("{0:?} is neither an IP address nor a valid DNS name")]
    Name(String),
    #[error("cannot sign the certificate: {0}")]
    Sign(rcgen::Error),
    #[error("not a PEM X.509 certificate: {0}")]
    Parse(String),
}

/// A certificate and its private key, PEM. The key is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyAndCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for KeyAndCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// What a client can see of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex, as `openssl x509 -serial` and `pg_stat_ssl.client_serial` print it.
    pub serial: String,
}

/// The names a serving certificate is valid for, DNS names and IP addresses apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// Where the instance can be reached.
pub struct Whereabouts<'a> {
    pub cluster: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    /// Its advertise address and pod IP (IPs or DNS names).
    pub addresses: &'a [String],
}

impl Names {
    /// The pod's own names (the StatefulSet's headless Service is named after the cluster, see
    /// config/services.yaml), the cluster's Services (`<cluster>-rw`, `-ro`, `-r`), each with
    /// its namespace forms, `localhost`, the loopback addresses, and the given addresses.
    pub fn for_instance(w: &Whereabouts<'_>) -> Names {
        let (c, ns) = (w.cluster, w.namespace);
        let mut dns = vec!["localhost".to_string(), w.pod.to_string()];
        let forms = |host: String| {
            [
                format!("{host}.{ns}"),
                format!("{host}.{ns}.svc"),
                format!("{host}.{ns}.svc.cluster.local"),
                host,
            ]
        };
        dns.extend(forms(format!("{}.{c}", w.pod)));
        for service in [
            c.to_string(),
            format!("{c}-rw"),
            format!("{c}-ro"),
            format!("{c}-r"),
        ] {
            dns.extend(forms(service));
        }
        let mut ips: Vec<IpAddr> =
            vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
        for a in w.addresses {
            match a.trim_start_matches('[').trim_end_matches(']').parse() {
                Ok(ip) => ips.push(ip),
                Err(_) => dns.push(a.to_ascii_lowercase()),
            }
        }
        dns.sort();
        dns.dedup();
        ips.sort();
        ips.dedup();
        Names { dns, ips }
    }

    fn sans(&self) -> Result<Vec<SanType>, IssueError> {
        let mut out = Vec::new();
        for name in &self.dns {
            let ia5 = name
                .as_str()
                .try_into()
                .map_err(|_| IssueError::Name(name.clone()))?;
            out.push(SanType::DnsName(ia5));
        }
        out.extend(self.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        Ok(out)
    }
}

fn at(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// A serial number unique to this key and moment, positive as X.509 wants it.
fn serial(key: &KeyPair, now: SystemTime) -> SerialNumber {
    let mut h = Sha256::new();
    h.update(key.public_key_raw());
    h.update(
        now.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_be_bytes(),
    );
    let mut bytes = h.finalize()[..16].to_vec();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero byte: the serial prints as 32 hex digits
    SerialNumber::from_slice(&bytes)
}

/// A new self-signed CA for `cluster`.
pub fn new_ca(cluster: &str, now: SystemTime) -> Result<KeyAndCert, IssueError> {
    let key = KeyPair::generate().map_err(IssueError::Key)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{cluster} CA"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "pgwarden");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = at(now - BACKDATE);
    params.not_after = at(now + CA_VALIDITY);
    params.serial_number = Some(serial(&key, now));
    let cert = params.self_signed(&key).map_err(IssueError::Sign)?;
    Ok(KeyAndCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A serving certificate for `names`, signed by `ca`, valid for `validity` from `now`. It is
/// also a client certificate (`clientAuth`), so that an instance can prove it is a member.
pub fn issue_server(
    ca: &KeyAndCert,
    common_name: &str,
    names: &Names,
    now: SystemTime,
    validity: Duration,
) -> Result<KeyAndCert, IssueError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(IssueError::Ca)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(IssueError::Ca)?;
    let key = KeyPair::generate().map_err(IssueError::Key)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = names.sans()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = at(now - BACKDATE);
    // Never past the CA's own end: a chain is valid only while every link is, and the renewal
    // (two thirds into the certificate's life) then comes before the CA ends too.
    let ca_end = info(&ca.cert_pem)?.not_after;
    params.not_after = at((now + validity).min(ca_end));
    params.serial_number = Some(serial(&key, now));
    let cert = params.signed_by(&key, &issuer).map_err(IssueError::Sign)?;
    Ok(KeyAndCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Reads the validity and serial of the first certificate in `pem`.
pub fn info(pem: &str) -> Result<CertInfo, IssueError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| IssueError::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| IssueError::Parse(e.to_string()))?;
    let v = cert.validity();
    let time = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok(CertInfo {
        not_before: time(v.not_before.timestamp()),
        not_after: time(v.not_after.timestamp()),
        serial: cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect(),
    })
}

/// When a certificate valid from `not_before` to `not_after` is renewed: after two thirds of
/// its lifetime (60 days of 90, a month before it expires, as cert-manager does), so that a
/// renewal that fails has weeks of retries.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + life * 2 / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names::for_instance(&Whereabouts {
            cluster: "pg",
            namespace: "db",
            pod: "pg-1",
            addresses: &["10.1.2.3".to_string(), "Pg-1.Example.org".to_string()],
        })
    }

    #[test]
    fn an_instance_is_named_by_its_pod_services_and_addresses() {
        let n = names();
        for name in [
            "localhost",
            "pg-1",
            "pg-1.pg",
            "pg-1.pg.db.svc",
            "pg-1.pg.db.svc.cluster.local",
            "pg-rw",
            "pg-rw.db",
            "pg-rw.db.svc",
            "pg-ro.db.svc.cluster.local",
            "pg-r.db.svc",
            "pg.db.svc",
            "pg-1.example.org",
        ] {
            assert!(n.dns.contains(&name.to_string()), "{name} missing: {n:?}");
        }
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(n.ips.contains(&ip));
        assert!(n.ips.contains(&"127.0.0.1".parse().unwrap()));
        assert!(!n.dns.iter().any(|d| d.contains("10.1.2.3")));
    }

    fn info_of(k: &KeyAndCert) -> CertInfo {
        info(&k.cert_pem).unwrap()
    }

    #[test]
    fn a_serving_certificate_chains_to_the_ca_with_its_names_and_validity() {
        let now = SystemTime::now();
        let ca = new_ca("pg", now).unwrap();
        let issued = issue_server(&ca, "pg-1", &names(), now, SERVER_VALIDITY).unwrap();
        let ca_info = info(&ca.cert_pem).unwrap();
        let info = info(&issued.cert_pem).unwrap();
        assert!(
            info.not_before <= now && info.not_before + BACKDATE >= now - Duration::from_secs(1)
        );
        let life = info.not_after.duration_since(now).unwrap();
        assert!(life <= SERVER_VALIDITY && life + Duration::from_secs(2) >= SERVER_VALIDITY);
        assert!(ca_info.not_after > info.not_after);
        // Asked for more than the CA has left: it ends with the CA.
        let long = issue_server(&ca, "pg-1", &names(), now, CA_VALIDITY * 2).unwrap();
        assert_eq!(info_of(&long).not_after, ca_info.not_after);
        assert_eq!(info.serial.len(), 32);
        assert_ne!(info.serial, ca_info.serial);

        // rustls (what the peers use) accepts it for an IP and a DNS name, signed by the CA.
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let leaf = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let now = UnixTime::now();
        for name in ["10.1.2.3", "pg-rw.db.svc", "pg-1.pg.db.svc.cluster.local"] {
            let server = ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&leaf, &[], &server, &[], now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = ServerName::try_from("pg-2.pg.db.svc").unwrap();
        assert!(verifier
            .verify_server_cert(&leaf, &[], &other, &[], now)
            .is_err());
        // Another cluster's CA does not vouch for it.
        let stranger = new_ca("pg", SystemTime::now()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(stranger.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let server = ServerName::try_from("10.1.2.3").unwrap();
        assert!(verifier
            .verify_server_cert(&leaf, &[], &server, &[], now)
            .is_err());
    }

    #[test]
    fn renewal_comes_at_two_thirds_of_the_lifetime() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = renew_at(start, start + SERVER_VALIDITY);
        assert_eq!(at, start + Duration::from_secs(60 * 24 * 3600));
        assert_eq!(renew_at(start, start), start, "an expired one at once");
    }

    #[test]
    fn keys_are_not_printed() {
        let ca = new_ca("pg", SystemTime::now()).unwrap();
        let shown = format!("{ca:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(info("no pem here").is_err());
        let ca = new_ca("pg", SystemTime::now()).unwrap();
        let broken = KeyAndCert {
            cert_pem: ca.cert_pem.clone(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
        };
        assert!(matches!(
            issue_server(
                &broken,
                "x",
                &Names::default(),
                SystemTime::now(),
                SERVER_VALIDITY
            ),
            Err(IssueError::Ca(_))
        ));
    }
}
