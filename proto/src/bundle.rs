//! The VM onboarding bundle: the directory `isthmusctl vm onboard` writes and the VM agent
//! reads. One type for both sides, so that what the operator's tool writes is exactly what
//! the agent accepts:
//!
//! - `agent.yaml`: where the registry is, and what the VM registers as ([`AgentBundle`]);
//! - `root-cert.pem`: the mesh root, which verifies the registry;
//! - `token`: a one-time bootstrap token for the group's identity (0600). It is spent on the
//!   first certificate; later starts renew with the certificate, so the file may be gone.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::config::{ConfigProblems, FieldProblem};
use crate::identity::{validate_dns_label, IdentityError, SpiffeId, TrustDomain};
pub use crate::tls::ROOT_CERT_FILE;

pub const AGENT_CONFIG_FILE: &str = "agent.yaml";
pub const TOKEN_FILE: &str = "token";
/// A bundle file is a few hundred bytes; anything much larger is the wrong file.
pub const MAX_BUNDLE_FILE_BYTES: u64 = 64 * 1024;

/// `agent.yaml`: everything the agent needs to enrol and register, besides the root and the
/// token. Every field is required; unknown fields are refused, so a typo is not silently
/// ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentBundle {
    /// The registry's gRPC address, `host:port`; for a set of registries several,
    /// comma-separated, or a name that resolves to each.
    pub registry: String,
    /// Absent or empty: the trust domain the root certificate names (the default trust
    /// domain for a root that names none); present, it must agree with the root.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trust_domain: String,
    /// The cluster whose registry (and CA) the VM joins.
    pub cluster: String,
    /// The VM's network.
    pub network: String,
    /// The WorkloadGroup the VM registers from, and its namespace.
    pub group: String,
    pub namespace: String,
    /// The group template's service account: the VM's identity is
    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`.
    pub service_account: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {}: {source} (is {} a bundle written by `isthmusctl vm onboard`?)", .path.display(), .path.parent().unwrap_or(Path::new(".")).display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Display: `FILE: FIELD: message[; FIELD: message ...]`, every problem found.
    #[error("{}: {}", .path.display(), FieldProblem::join(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<FieldProblem>,
    },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AgentBundle {
    pub fn config_path(dir: &Path) -> PathBuf {
        dir.join(AGENT_CONFIG_FILE)
    }

    pub fn root_cert_path(dir: &Path) -> PathBuf {
        dir.join(ROOT_CERT_FILE)
    }

    pub fn token_path(dir: &Path) -> PathBuf {
        dir.join(TOKEN_FILE)
    }

    /// Reads and checks the bundle in `dir`: `agent.yaml` (every field), `root-cert.pem`
    /// (present, PEM certificates), and the token when present (well-formed, and for this
    /// bundle's identity). Errors name the file and the field.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let config_path = Self::config_path(dir);
        let text = read_bounded(&config_path)?;
        let mut bundle = Self::from_yaml(&config_path, &text)?;
        let root_path = Self::root_cert_path(dir);
        let root = read_bounded(&root_path)?;
        let roots = crate::tls::parse_certs(&root_path, root.as_bytes()).map_err(|e| {
            BundleError::Invalid {
                path: root_path.clone(),
                problems: vec![FieldProblem::new(
                    "",
                    format!("not the mesh root certificate: {e}"),
                )],
            }
        })?;
        if bundle.trust_domain.is_empty() {
            bundle.trust_domain = roots
                .first()
                .and_then(|c| crate::tls::trust_domain_of_ca(c))
                .unwrap_or_else(|| crate::subscription::DEFAULT_TRUST_DOMAIN.to_string());
        }
        if let Some(why) = roots
            .iter()
            .find_map(|c| root_problem(c, &bundle.trust_domain))
        {
            return Err(BundleError::Invalid {
                path: root_path,
                problems: vec![FieldProblem::new("", why)],
            });
        }
        if let Some(token) = Self::read_token(dir)? {
            bundle.check_token(&Self::token_path(dir), &token)?;
        }
        Ok(bundle)
    }

    /// The bootstrap token, if the bundle still has one.
    pub fn read_token(dir: &Path) -> Result<Option<String>, BundleError> {
        match read_bounded(&Self::token_path(dir)) {
            Ok(t) => Ok(Some(t.trim().to_string())),
            Err(BundleError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A warning when the token file can be read by anyone but its owner: whoever reads it
    /// first can take the VM's identity. `None` when it is private or absent.
    pub fn token_exposure(dir: &Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let path = Self::token_path(dir);
        let mode = std::fs::metadata(&path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then(|| {
            format!(
                "{} is readable by other users (mode {mode:04o}): anyone who reads it before the \
                 agent spends it can take this VM's identity; run chmod 600 on it",
                path.display()
            )
        })
    }

    /// Parses `agent.yaml`'s text; `path` names it in errors.
    pub fn from_yaml(path: &Path, text: &str) -> Result<Self, BundleError> {
        let invalid = |problems| BundleError::Invalid {
            path: path.to_path_buf(),
            problems,
        };
        let value = crate::config::yaml_value(text)
            .map_err(|why| invalid(vec![FieldProblem::new("", why)]))?;
        let bundle: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            invalid(vec![FieldProblem::new(&field, e.inner().to_string())])
        })?;
        bundle.check().map_err(|p| invalid(p.problems))?;
        Ok(bundle)
    }

    /// Every field whose value cannot work, each named.
    pub fn check(&self) -> Result<(), ConfigProblems> {
        let mut problems = ConfigProblems::new(AGENT_CONFIG_FILE);
        let entries = crate::registries::entries(&self.registry);
        if entries.is_empty() {
            problems.push(
                "registry",
                format!("{:?} is not host:port: empty", self.registry),
            );
        }
        for e in entries {
            if let Err(why) = check_host_port(e) {
                problems.push("registry", why);
            }
        }
        // Empty: the root's, filled in by `load`.
        if !self.trust_domain.is_empty() {
            if let Err(e) = TrustDomain::new(&self.trust_domain) {
                problems.push("trustDomain", e.to_string());
            }
        }
        for (field, what, value) in [
            ("cluster", "cluster", &self.cluster),
            ("network", "network", &self.network),
            ("namespace", "namespace", &self.namespace),
            ("serviceAccount", "service account", &self.service_account),
        ] {
            if let Err(e) = validate_dns_label(what, value) {
                problems.push(field, e.to_string());
            }
        }
        if self.group.is_empty() || self.group.len() > 253 {
            problems.push(
                "group",
                format!(
                    "{:?} is not a WorkloadGroup name (1-253 characters)",
                    self.group
                ),
            );
        } else if let Some(e) = self
            .group
            .split('.')
            .find_map(|l| validate_dns_label("WorkloadGroup name", l).err())
        {
            problems.push("group", e.to_string());
        }
        problems.into_result()
    }

    /// The identity the VM holds: the group's.
    pub fn identity(&self) -> Result<SpiffeId, IdentityError> {
        SpiffeId::workload(
            &TrustDomain::new(&self.trust_domain)?,
            &self.namespace,
            &self.service_account,
        )
    }

    /// A token that is well-formed and for this bundle's identity.
    fn check_token(&self, path: &Path, token: &str) -> Result<(), BundleError> {
        let invalid = |message: String| BundleError::Invalid {
            path: path.to_path_buf(),
            problems: vec![FieldProblem::new("", message)],
        };
        let claims = crate::token::parse(token)
            .map_err(|e| invalid(e.to_string()))?
            .claims;
        let theirs = claims.identity().map_err(|e| invalid(e.to_string()))?;
        let ours = self.identity().map_err(|e| invalid(e.to_string()))?;
        if theirs != ours {
            return Err(invalid(format!(
                "the token is for {theirs}, but {AGENT_CONFIG_FILE} registers as {ours}"
            )));
        }
        Ok(())
    }

    /// `agent.yaml` as written into a bundle.
    pub fn to_yaml(&self) -> String {
        let body = serde_yaml_ng::to_string(self).expect("a struct of strings serializes");
        format!("# isthmus VM agent bundle, written by `isthmusctl vm onboard`.\n{body}")
    }

    /// Writes the bundle into `dir` (created if needed): `agent.yaml`, `root-cert.pem`, and
    /// the token readable by its owner only. Returns the paths written.
    pub fn write(
        &self,
        dir: &Path,
        root_pem: &str,
        token: &str,
    ) -> Result<Vec<PathBuf>, BundleError> {
        std::fs::create_dir_all(dir).map_err(|source| BundleError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let files = [
            (Self::config_path(dir), self.to_yaml(), 0o644),
            (Self::root_cert_path(dir), root_pem.to_string(), 0o644),
            (Self::token_path(dir), format!("{}\n", token.trim()), 0o600),
        ];
        let mut written = Vec::new();
        for (path, content, mode) in files {
            crate::certs::write_atomic(&path, content.as_bytes(), mode).map_err(|e| match e {
                crate::certs::CertsError::Write { source, .. } => BundleError::Write {
                    path: path.clone(),
                    source,
                },
                other => BundleError::Write {
                    path: path.clone(),
                    source: std::io::Error::other(other.to_string()),
                },
            })?;
            written.push(path);
        }
        Ok(written)
    }

    /// How the agent reaches the registry with this bundle, once it holds a certificate in
    /// `cert_dir`.
    pub fn registry_settings(
        &self,
        dir: &Path,
        cert_dir: &Path,
    ) -> crate::subscription::RegistrySettings {
        crate::subscription::RegistrySettings {
            addr: self.registry.clone(),
            root_cert: Self::root_cert_path(dir),
            cert_dir: cert_dir.to_path_buf(),
            trust_domain: self.trust_domain.clone(),
        }
    }
}

/// Why `cert` cannot be the root of `trust_domain`'s mesh: not a CA, expired, or the root
/// of another trust domain (our CA names its trust domain in a URI SAN).
fn root_problem(cert: &rustls_pki_types::CertificateDer<'_>, trust_domain: &str) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, x509) = match X509Certificate::from_der(cert) {
        Ok(c) => c,
        Err(e) => return Some(format!("not a certificate: {e}")),
    };
    let subject = x509.subject().to_string();
    if !x509.is_ca() {
        return Some(format!(
            "{subject:?} is not a CA certificate; the bundle needs the mesh root (the CA's root-cert.pem)"
        ));
    }
    if !x509.validity().is_valid() {
        return Some(format!(
            "the root {subject:?} is not valid now (valid {} to {})",
            x509.validity().not_before,
            x509.validity().not_after
        ));
    }
    crate::tls::trust_domain_of_ca(cert)
        .filter(|td| td != trust_domain)
        .map(|td| {
            format!(
                "this is the root of trust domain {td:?}, but {AGENT_CONFIG_FILE} says \
                 trustDomain {trust_domain:?}: wrong root-cert.pem, or drop trustDomain to \
                 take the root's"
            )
        })
}

fn check_host_port(s: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{s:?} is not host:port: {why}"));
    let Some((host, port)) = s.rsplit_once(':') else {
        return bad("no port");
    };
    let (host, bracketed) = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) => (inner, true),
        None => (host, false),
    };
    if host.is_empty() {
        return bad("no host");
    }
    if host.contains(':') != bracketed || (bracketed && host.parse::<std::net::Ipv6Addr>().is_err())
    {
        return bad("an IPv6 address goes in brackets, e.g. [2001:db8::1]:15012");
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => bad("the port is not 1-65535"),
    }
}

fn read_bounded(path: &Path) -> Result<String, BundleError> {
    let read_err = |source| BundleError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_BUNDLE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let invalid = |message: String| BundleError::Invalid {
        path: path.to_path_buf(),
        problems: vec![FieldProblem::new("", message)],
    };
    if bytes.len() as u64 > MAX_BUNDLE_FILE_BYTES {
        return Err(invalid(format!(
            "is larger than {MAX_BUNDLE_FILE_BYTES} bytes; is it the right file?"
        )));
    }
    String::from_utf8(bytes).map_err(|_| invalid("is not UTF-8 text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> AgentBundle {
        AgentBundle {
            registry: "registry.example:15012".into(),
            trust_domain: "cluster.local".into(),
            cluster: "cluster-a".into(),
            network: "network-a".into(),
            group: "vm-web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        }
    }

    /// A token-shaped string for `ns`/`sa` (unsigned: only its claims are read here).
    fn token(ns: &str, sa: &str) -> String {
        let claims = crate::token::TokenClaims {
            td: "cluster.local".into(),
            ns: ns.into(),
            sa: sa.into(),
            cluster: "cluster-a".into(),
            iat: 0,
            exp: i64::MAX,
            jti: "j".into(),
            kid: "k".into(),
        };
        format!(
            "{}.{}",
            crate::token::signed_text(&claims).unwrap(),
            crate::token::encode_signature(b"sig")
        )
    }

    /// The root of a test CA for `trust_domain` (the one test PKI).
    fn root(trust_domain: &str) -> String {
        crate::test_pki::TestCa::new(trust_domain).root_pem()
    }

    fn written() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bundle");
        bundle()
            .write(&dir, &root(&bundle().trust_domain), &token("shop", "web"))
            .unwrap();
        (tmp, dir)
    }

    #[test]
    fn a_root_that_cannot_be_the_mesh_root_is_named() {
        let (_tmp, dir) = written();
        let root_path = AgentBundle::root_cert_path(&dir);
        let leaf = rcgen::generate_simple_self_signed(vec!["leaf.test".into()])
            .unwrap()
            .cert
            .pem();
        for (pem, want) in [
            (leaf, "is not a CA certificate"),
            (
                root("other.example"),
                "root of trust domain \"other.example\"",
            ),
        ] {
            std::fs::write(&root_path, pem).unwrap();
            let err = AgentBundle::load(&dir).unwrap_err().to_string();
            assert!(
                err.starts_with(&root_path.display().to_string()) && err.contains(want),
                "{err}"
            );
        }
    }

    #[test]
    fn written_bundle_loads_and_the_token_is_private() {
        let (_tmp, dir) = written();
        assert_eq!(AgentBundle::load(&dir).unwrap(), bundle());
        assert_eq!(
            AgentBundle::read_token(&dir).unwrap().unwrap(),
            token("shop", "web")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(TOKEN_FILE), 0o600);
            assert_eq!(mode(AGENT_CONFIG_FILE), 0o644);
        }
        // A spent token may be gone: the agent renews with its certificate.
        std::fs::remove_file(dir.join(TOKEN_FILE)).unwrap();
        assert_eq!(AgentBundle::load(&dir).unwrap(), bundle());
    }

    #[test]
    fn a_missing_file_is_named() {
        for file in [AGENT_CONFIG_FILE, ROOT_CERT_FILE] {
            let (_tmp, dir) = written();
            std::fs::remove_file(dir.join(file)).unwrap();
            let err = AgentBundle::load(&dir).unwrap_err().to_string();
            assert!(
                err.contains(&dir.join(file).display().to_string())
                    && err.contains("isthmusctl vm onboard"),
                "{file}: {err}"
            );
        }
    }

    #[test]
    fn bad_fields_are_named_with_the_file() {
        let (_tmp, dir) = written();
        let path = dir.join(AGENT_CONFIG_FILE);
        let cases = [
            ("network: network-a", "network: Network_A", "network: "),
            (
                "registry: registry.example:15012",
                "registry: registry.example",
                "registry: ",
            ),
            (
                "trustDomain: cluster.local",
                "trustDomain: Cluster Local",
                "trustDomain: ",
            ),
            (
                "serviceAccount: web",
                "serviceAccount: web\nserviceAcount: web",
                "unknown field `serviceAcount`",
            ),
            ("group: vm-web\n", "", "missing field `group`"),
            ("cluster: cluster-a", "cluster: [a, b]", "cluster: "),
        ];
        let good = std::fs::read_to_string(&path).unwrap();
        for (from, to, want) in cases {
            assert!(good.contains(from), "{from}");
            std::fs::write(&path, good.replace(from, to)).unwrap();
            let err = AgentBundle::load(&dir).unwrap_err().to_string();
            assert!(
                err.starts_with(&path.display().to_string()) && err.contains(want),
                "{to:?}: {err}"
            );
        }
    }

    #[test]
    fn a_token_others_can_read_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, dir) = written();
        assert_eq!(AgentBundle::token_exposure(&dir), None, "written 0600");
        let path = dir.join(TOKEN_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = AgentBundle::token_exposure(&dir).unwrap();
        assert!(
            warning.contains(&path.display().to_string())
                && warning.contains("0644")
                && warning.contains("chmod 600"),
            "{warning}"
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            AgentBundle::token_exposure(&dir),
            None,
            "no token, nothing exposed"
        );
    }

    #[test]
    fn a_token_for_another_identity_or_not_a_token_is_named() {
        let (_tmp, dir) = written();
        let path = dir.join(TOKEN_FILE);
        std::fs::write(&path, token("shop", "admin")).unwrap();
        let err = AgentBundle::load(&dir).unwrap_err().to_string();
        assert!(
            err.starts_with(&path.display().to_string())
                && err.contains("sa/admin")
                && err.contains("sa/web"),
            "{err}"
        );
        std::fs::write(&path, "hunter2").unwrap();
        let err = AgentBundle::load(&dir).unwrap_err().to_string();
        assert!(
            err.starts_with(&path.display().to_string()) && err.contains("bootstrap token"),
            "{err}"
        );
        std::fs::write(dir.join(ROOT_CERT_FILE), "not a certificate").unwrap();
        let err = AgentBundle::load(&dir).unwrap_err().to_string();
        assert!(err.contains(ROOT_CERT_FILE), "{err}");
    }

    #[test]
    fn host_port() {
        for ok in ["r:15012", "10.0.0.1:15012", "[2001:db8::1]:15012"] {
            assert!(check_host_port(ok).is_ok(), "{ok}");
        }
        for bad in [
            "r",
            ":15012",
            "r:0",
            "r:99999",
            "2001:db8::1:15012",
            "[r]:15012",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }
}
