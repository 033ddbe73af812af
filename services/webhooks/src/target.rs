//! Which endpoint URLs a webhook may call. A tenant must not make the service call into its own
//! network (the database, the storage, cloud metadata at 169.254.169.254), so URLs whose host
//! is or resolves to a loopback, private, link-local or otherwise non-public address are
//! refused, when registered and again at every delivery (a name can resolve elsewhere later),
//! unless the operator allows them.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use reqwest::{
    dns::{Addrs, Name, Resolve, Resolving},
    Url,
};

/// Longest accepted endpoint URL.
pub const MAX_URL_CHARS: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the URL is not valid: {0}")]
    Malformed(String),
    #[error("the URL must be http or https, not {0}")]
    Scheme(String),
    #[error("the URL's host {0} could not be resolved")]
    Unresolvable(String),
    #[error(
        "the URL's host {host} is or resolves to {addr}, a loopback, private or link-local \
         address; webhooks go to public addresses only"
    )]
    NotPublic { host: String, addr: IpAddr },
}

/// Whether non-public addresses may be called (tests and `sidbooth dev` allow them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetPolicy {
    pub allow_private: bool,
}

impl TargetPolicy {
    fn permits(&self, addr: IpAddr) -> bool {
        self.allow_private || is_public(addr)
    }

    /// Checks a URL as given at registration: syntax, scheme, and every address its host
    /// resolves to now. Returns the URL as it will be called.
    pub async fn check(&self, url: &str) -> Result<Url, TargetError> {
        if url.len() > MAX_URL_CHARS {
            return Err(TargetError::Malformed(format!(
                "longer than {MAX_URL_CHARS} characters"
            )));
        }
        let parsed = Url::parse(url).map_err(|e| TargetError::Malformed(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(TargetError::Scheme(parsed.scheme().to_owned()));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| TargetError::Malformed("no host".into()))?
            .to_owned();
        let port = parsed.port_or_known_default().unwrap_or(443);
        let addrs: Vec<SocketAddr> = match literal_ip(&host) {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|_| TargetError::Unresolvable(host.clone()))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(TargetError::Unresolvable(host));
        }
        if let Some(bad) = addrs.iter().find(|a| !self.permits(a.ip())) {
            return Err(TargetError::NotPublic {
                host,
                addr: bad.ip(),
            });
        }
        Ok(parsed)
    }

    /// Checks a URL just before a delivery. Names are checked by [`PolicyResolver`] as the
    /// client resolves them; an IP literal never reaches a resolver, so it is checked here.
    pub fn check_literal(&self, url: &Url) -> Result<(), TargetError> {
        let host = url.host_str().unwrap_or_default();
        match literal_ip(host) {
            Some(addr) if !self.permits(addr) => Err(TargetError::NotPublic {
                host: host.to_owned(),
                addr,
            }),
            _ => Ok(()),
        }
    }

    /// A DNS resolver for the HTTP client that drops addresses this policy refuses, so a name
    /// that resolves to a private address at delivery time is not called.
    pub fn resolver(self) -> Arc<PolicyResolver> {
        Arc::new(PolicyResolver { policy: self })
    }
}

/// An IP literal host (`[::1]` in URLs has brackets).
fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Whether an address is on the public internet.
pub fn is_public(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let [o0, o1, ..] = a.octets();
    !(a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_documentation()
        || o0 == 0
        // Shared address space (carrier-grade NAT), 100.64.0.0/10.
        || (o0 == 100 && (o1 & 0xc0) == 64)
        // Benchmarking, 198.18.0.0/15, and reserved, 240.0.0.0/4.
        || (o0 == 198 && (o1 & 0xfe) == 18)
        || o0 >= 240)
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    let first = a.segments()[0];
    !(a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        // Unique local, fc00::/7, and link-local, fe80::/10.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        // Documentation, 2001:db8::/32.
        || (first == 0x2001 && a.segments()[1] == 0x0db8))
}

/// See [`TargetPolicy::resolver`].
pub struct PolicyResolver {
    policy: TargetPolicy,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| policy.permits(a.ip()))
                .collect();
            if found.is_empty() {
                return Err(format!(
                    "{host} resolves to no address a webhook may call (public addresses only)"
                )
                .into());
            }
            let addrs: Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_not_public() {
        for addr in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(addr.parse().unwrap()), "{addr}");
        }
        for addr in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(is_public(addr.parse().unwrap()), "{addr}");
        }
    }

    #[tokio::test]
    async fn registration_refuses_what_the_policy_does_not_allow() {
        let strict = TargetPolicy::default();
        for url in [
            "http://127.0.0.1:9/hook",
            "http://[::1]/hook",
            "http://localhost:8080/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.5/",
        ] {
            let e = strict.check(url).await.unwrap_err();
            assert!(matches!(e, TargetError::NotPublic { .. }), "{url}: {e:?}");
        }
        assert!(matches!(
            strict.check("ftp://example.com/").await,
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            strict.check("not a url").await,
            Err(TargetError::Malformed(_))
        ));
        let open = TargetPolicy {
            allow_private: true,
        };
        assert!(open.check("http://127.0.0.1:9/hook").await.is_ok());
        assert!(open.check("http://localhost:9/hook").await.is_ok());
    }

    #[test]
    fn literals_are_checked_before_delivery() {
        let strict = TargetPolicy::default();
        let url = Url::parse("http://[::1]:8080/x").unwrap();
        assert!(strict.check_literal(&url).is_err());
        assert!(strict
            .check_literal(&Url::parse("http://8.8.8.8/").unwrap())
            .is_ok());
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses() {
        let strict = TargetPolicy::default().resolver();
        let name: Name = "localhost".parse().unwrap();
        assert!(strict.resolve(name).await.is_err());
        let open = TargetPolicy {
            allow_private: true,
        }
        .resolver();
        let addrs: Vec<_> = open
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
