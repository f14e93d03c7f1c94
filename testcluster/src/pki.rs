//! The cluster's certificates, made fresh for every cluster the way envtest makes them: one CA that
//! signs the API server's serving certificate and every client's certificate (the admin, the
//! controller-manager, the scheduler, each node), and the service-account signing key.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// A certificate and its key, as PEM files on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// The CA and the files every component reads.
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (clients trust it; the API server verifies client certificates with it).
    pub ca: CertFiles,
    /// The API server's serving certificate (`127.0.0.1`, `localhost` and the service names).
    pub serving: CertFiles,
    /// The service-account token signing key (its public half is `service-account.pub` beside it).
    pub service_account_key: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

impl Pki {
    /// A new CA, serving certificate and service-account key under `dir`.
    /// `addresses` are the API server's addresses besides `127.0.0.1` (the pod network's gateway).
    pub fn create(dir: &Path, addresses: &[Ipv4Addr]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "pretrain-test-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = params.self_signed(&ca_key)?;
        let ca = CertFiles { cert: dir.join("ca.crt"), key: dir.join("ca.key") };
        write(&ca.cert, &ca_cert.pem())?;
        write(&ca.key, &ca_key.serialize_pem())?;
        let issuer = Issuer::new(params, ca_key);

        let sa = KeyPair::generate()?;
        let service_account_key = dir.join("service-account.key");
        write(&service_account_key, &sa.serialize_pem())?;
        write(&dir.join("service-account.pub"), &sa.public_key_pem())?;

        let mut pki = Self { dir: dir.to_path_buf(), issuer, ca: ca.clone(), serving: ca, service_account_key };

        let names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"];
        pki.serving = pki.sign("apiserver", "kube-apiserver", None, &names, addresses)?;
        Ok(pki)
    }

    /// A client certificate for user `user` in group `group` (`system:masters` for the admin),
    /// written as `<file>.crt` and `<file>.key`.
    pub fn client(&self, file: &str, user: &str, group: Option<&str>) -> anyhow::Result<CertFiles> {
        self.sign(file, user, group, &[], &[])
    }

    fn sign(
        &self,
        file: &str,
        common_name: &str,
        organization: Option<&str>,
        dns: &[&str],
        addresses: &[Ipv4Addr],
    ) -> anyhow::Result<CertFiles> {
        let server = !dns.is_empty();
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns.iter().map(|d| (*d).to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        if let Some(o) = organization {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        if server {
            params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            // The `kubernetes` Service's cluster IP, which in-cluster clients may dial.
            params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
            for address in addresses {
                params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(*address)));
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = CertFiles { cert: self.dir.join(format!("{file}.crt")), key: self.dir.join(format!("{file}.key")) };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }

    /// The public key that verifies service-account tokens.
    pub fn service_account_public_key(&self) -> PathBuf {
        self.dir.join("service-account.pub")
    }

    /// Writes a kubeconfig at `path` for `server` that authenticates with `client`.
    pub fn kubeconfig(&self, path: &Path, server: &str, client: &CertFiles) -> anyhow::Result<()> {
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "pretrain-test", "cluster": {
                "server": server,
                "certificate-authority": self.ca.cert,
            }}],
            "users": [{"name": "user", "user": {
                "client-certificate": client.cert,
                "client-key": client.key,
            }}],
            "contexts": [{"name": "pretrain-test", "context": {"cluster": "pretrain-test", "user": "user"}}],
            "current-context": "pretrain-test",
        });
        write(path, &serde_yaml::to_string(&config)?)
    }
}
