//! The SNI routing key, Istio's AUTO_PASSTHROUGH form: `outbound_.<port>_.<subset>_.<hostname>`;
//! with no subset it reads `outbound_.9080_._.reviews.shop.svc.cluster.local`. The workload
//! proxy writes it as the SNI of the mTLS it originates, the east-west gateway routes on it
//! without terminating TLS, and tests and benchmarks name destinations with it, so it lives
//! here, in the mesh's shared language. The reader that finds the SNI in a client's first
//! bytes is the proxy core's (`isthmus_proxy::client_hello`).

use std::fmt;

/// A parsed `outbound_.<port>_.<subset>_.<hostname>` key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SniKey {
    pub port: u16,
    /// Empty for no subset.
    pub subset: String,
    pub hostname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniKeyError {
    #[error("SNI {0:?} is not a mesh key (outbound_.<port>_.<subset>_.<hostname>)")]
    NotMeshKey(String),
    #[error("SNI {sni:?}: {port:?} is not a port (1-65535)")]
    BadPort { sni: String, port: String },
    #[error("SNI {0:?} has an empty hostname")]
    EmptyHostname(String),
}

impl SniKey {
    pub fn new(port: u16, subset: &str, hostname: &str) -> Self {
        Self {
            port,
            subset: subset.to_string(),
            hostname: hostname.to_string(),
        }
    }

    pub fn parse(sni: &str) -> Result<Self, SniKeyError> {
        let not_key = || SniKeyError::NotMeshKey(sni.to_string());
        let rest = sni.strip_prefix("outbound_.").ok_or_else(not_key)?;
        let (port, rest) = rest.split_once("_.").ok_or_else(not_key)?;
        let (subset, hostname) = rest.split_once("_.").ok_or_else(not_key)?;
        let port_num = match port.parse::<u16>() {
            Ok(p) if p != 0 && !port.starts_with('+') => p,
            _ => {
                return Err(SniKeyError::BadPort {
                    sni: sni.to_string(),
                    port: port.to_string(),
                })
            }
        };
        if hostname.is_empty() {
            return Err(SniKeyError::EmptyHostname(sni.to_string()));
        }
        Ok(Self {
            port: port_num,
            subset: subset.to_string(),
            hostname: hostname.to_ascii_lowercase(),
        })
    }
}

impl fmt::Display for SniKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outbound_.{}_.{}_.{}",
            self.port, self.subset, self.hostname
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_keys_round_trip_and_bad_ones_are_named() {
        let k = SniKey::parse("outbound_.9080_._.reviews.shop.svc.cluster.local").unwrap();
        assert_eq!(k, SniKey::new(9080, "", "reviews.shop.svc.cluster.local"));
        assert_eq!(
            k.to_string(),
            "outbound_.9080_._.reviews.shop.svc.cluster.local"
        );
        let v2 = SniKey::parse("outbound_.80_.v2_.Web.Example.com").unwrap();
        assert_eq!(
            (v2.subset.as_str(), v2.hostname.as_str()),
            ("v2", "web.example.com")
        );
        for bad in [
            "reviews.shop",
            "outbound_.x_._.h",
            "outbound_.0_._.h",
            "outbound_.70000_._.h",
            "outbound_.+80_._.h",
            "outbound_.80_._.",
            "outbound_.80",
            "",
        ] {
            assert!(SniKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            SniKey::parse("outbound_.99999_._.h"),
            Err(SniKeyError::BadPort { .. })
        ));
    }
}
