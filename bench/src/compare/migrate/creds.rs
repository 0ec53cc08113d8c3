//! Throwaway TLS credentials for the TLS row: a CA and a server and client certificate
//! signed by it, in QEMU's tls-creds-x509 layout (`ca-cert.pem`, `server-cert.pem`,
//! `server-key.pem`, `client-cert.pem`, `client-key.pem`), which is what
//! `vhost-blk-backend --tls-creds DIR` reads on both ends.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::compare::CompareError;

fn tls_err(e: rcgen::Error) -> CompareError {
    CompareError::Run(format!("making the TLS credentials: {e}"))
}

/// Writes the five files into `dir` (created if missing). Both certificates name
/// 127.0.0.1 and localhost, where the benchmark's destination listens.
pub(super) fn make(dir: &Path) -> Result<(), CompareError> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate().map_err(tls_err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "bench migration CA");
    let ca_cert = ca.self_signed(&ca_key).map_err(tls_err)?;
    let issuer = Issuer::new(ca, ca_key);
    std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem())?;
    for side in ["server", "client"] {
        let key = KeyPair::generate().map_err(tls_err)?;
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(tls_err)?;
        p.distinguished_name.push(DnType::CommonName, side);
        let cert = p.signed_by(&key, &issuer).map_err(tls_err)?;
        std::fs::write(dir.join(format!("{side}-cert.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{side}-key.pem")), key.serialize_pem())?;
    }
    Ok(())
}
