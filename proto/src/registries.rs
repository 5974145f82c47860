//! A set of registries, as the programs' `--registry` names it: one `host:port`, or several
//! separated by commas; a host name that resolves to several addresses (a headless Service,
//! round-robin DNS) is one registry per address.
//!
//! A client follows one registry of the set at a time. A connect tries the registry the
//! process followed last first, then the others in order after it; a registry whose stream
//! was lost ([`lost`]) is tried last, so that the next connect goes to another one at once
//! rather than waiting out a dead host's connect timeout. What is followed is kept per
//! process and per `--registry` value, so every client of a program (Watch, registration,
//! certificate renewals) moves together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

#[derive(Debug, Default, Clone)]
struct Following {
    /// The registry the last successful connect reached.
    followed: Option<String>,
    /// A registry whose stream was lost: tried last until another answers.
    lost: Option<String>,
}

static FOLLOWING: Mutex<Option<HashMap<String, Following>>> = Mutex::new(None);

fn with<T>(set: &str, f: impl FnOnce(&mut Following) -> T) -> T {
    let mut all = FOLLOWING.lock().unwrap_or_else(|p| p.into_inner());
    f(all
        .get_or_insert_with(HashMap::new)
        .entry(set.to_string())
        .or_default())
}

/// The entries of a `--registry` value, in order, trimmed; empty ones dropped.
pub fn entries(set: &str) -> Vec<&str> {
    set.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect()
}

/// Every registry `set` names, in the order a connect tries them: an address as given, a
/// name as every address it resolves to (a name that does not resolve stays as it is, so
/// that the connect names it in its error), then rotated to start with the one followed
/// last, or, after one was lost, with the one after it.
pub async fn candidates(set: &str) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    for entry in entries(set) {
        if entry.parse::<SocketAddr>().is_ok() {
            all.push(entry.to_string());
            continue;
        }
        match tokio::net::lookup_host(entry).await {
            Ok(addrs) => {
                let before = all.len();
                for a in addrs {
                    let a = a.to_string();
                    if !all.contains(&a) {
                        all.push(a);
                    }
                }
                if all.len() == before {
                    all.push(entry.to_string());
                }
            }
            Err(_) => all.push(entry.to_string()),
        }
    }
    let state = with(set, |f| f.clone());
    let start = match (&state.lost, &state.followed) {
        (Some(lost), _) => all.iter().position(|a| a == lost).map(|i| i + 1),
        (None, Some(followed)) => all.iter().position(|a| a == followed),
        (None, None) => None,
    };
    if let Some(i) = start {
        let i = i % all.len().max(1);
        all.rotate_left(i);
    }
    all
}

/// Records that `addr` of `set` answered: it is the one followed.
pub fn answered(set: &str, addr: &str) {
    with(set, |f| {
        f.followed = Some(addr.to_string());
        f.lost = None;
    });
}

/// Records that the stream to `addr` of `set` was lost: the next connect tries the others
/// first.
pub fn lost(set: &str, addr: &str) {
    with(set, |f| f.lost = Some(addr.to_string()));
}

/// The registry of `set` this process follows (the last one that answered).
pub fn followed(set: &str) -> Option<String> {
    with(set, |f| f.followed.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_start_with_the_followed_one_and_after_a_lost_one() {
        let set = "10.0.0.1:15012, 10.0.0.2:15012,,10.0.0.3:15012";
        assert_eq!(entries(set).len(), 3);
        assert_eq!(
            candidates(set).await,
            ["10.0.0.1:15012", "10.0.0.2:15012", "10.0.0.3:15012"]
        );
        answered(set, "10.0.0.2:15012");
        assert_eq!(followed(set).as_deref(), Some("10.0.0.2:15012"));
        assert_eq!(
            candidates(set).await,
            ["10.0.0.2:15012", "10.0.0.3:15012", "10.0.0.1:15012"]
        );
        lost(set, "10.0.0.2:15012");
        assert_eq!(
            candidates(set).await,
            ["10.0.0.3:15012", "10.0.0.1:15012", "10.0.0.2:15012"]
        );
        answered(set, "10.0.0.3:15012");
        assert_eq!(candidates(set).await[0], "10.0.0.3:15012");
        // The last one lost: the first is next.
        lost(set, "10.0.0.3:15012");
        assert_eq!(candidates(set).await[0], "10.0.0.1:15012");
    }

    #[tokio::test]
    async fn a_name_is_every_address_it_resolves_to() {
        let set = "localhost:15012";
        let all = candidates(set).await;
        assert!(!all.is_empty());
        assert!(
            all.iter().all(|a| a.parse::<SocketAddr>().is_ok()),
            "{all:?}"
        );
        // One that does not resolve stays, for the connect's error to name.
        assert_eq!(
            candidates("no-such-registry.invalid:15012").await,
            ["no-such-registry.invalid:15012"]
        );
    }
}
