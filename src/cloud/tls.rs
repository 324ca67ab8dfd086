//! TLS for the cloud link: rustls with the ring provider, the broker's CA from the config (the
//! system roots only when asked), and this gateway's certificate and key for mutual TLS.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Builds the client configuration for mutual TLS.
pub fn client_config(
    ca_file: Option<&Path>,
    use_system_roots: bool,
    cert_file: &Path,
    key_file: &Path,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    if let Some(ca) = ca_file {
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading CA file `{}`", ca.display()))?
        {
            let cert = cert.with_context(|| format!("CA file `{}` is not PEM", ca.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("CA file `{}` holds a bad certificate", ca.display()))?;
        }
    }
    if use_system_roots {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
    }
    if roots.is_empty() {
        anyhow::bail!("no CA certificate to check the broker with (set cloud.ca_file)");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .with_context(|| format!("reading certificate `{}`", cert_file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("certificate `{}` is not PEM", cert_file.display()))?;
    if chain.is_empty() {
        anyhow::bail!(
            "certificate file `{}` holds no certificate",
            cert_file.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("key file `{}` holds no private key", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the client certificate and key do not match or are unsupported")?;
    Ok(Arc::new(config))
}
