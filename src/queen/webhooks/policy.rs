//! Where webhook deliveries may go: an allow/deny policy on the addresses a URL's host resolves to, checked
//! when a job is submitted and again on every connection (through the HTTP client's resolver, so a name that
//! later resolves elsewhere, DNS rebinding, is refused too). By default only public addresses are allowed:
//! loopback, private, link-local, shared (CGNAT), multicast, documentation and other special-purpose ranges
//! are refused unless `--webhook-allow` names their range; `--webhook-deny` refuses more, and wins over an
//! allow. A host with any refused address is refused.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

/// How long a submission waits for its webhook's host to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Ranges exempt from the default refusals (`--webhook-allow`).
    pub allow: Vec<IpNet>,
    /// Ranges refused on top of them (`--webhook-deny`); wins over `allow`.
    pub deny: Vec<IpNet>,
}

impl AddressPolicy {
    /// `--webhook-allow`/`--webhook-deny` values: CIDR ranges, or single addresses.
    pub fn parse_ranges(list: &[String], flag: &str) -> anyhow::Result<Vec<IpNet>> {
        list.iter()
            .map(|text| {
                let text = text.trim();
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| anyhow::anyhow!("{flag} {text:?} is not an address range (e.g. 10.0.0.0/8, ::1/128)"))
            })
            .collect()
    }

    /// Whether deliveries may go to `ip`; the error says why not.
    pub fn check(&self, raw: IpAddr) -> Result<(), String> {
        let ip = canonical(raw);
        // A range matches an address as written or as the IPv4 address it carries.
        let matches = |r: &IpNet| r.contains(&ip) || r.contains(&raw);
        if let Some(range) = self.deny.iter().find(|r| matches(r)) {
            return Err(format!("{ip} is in {range}, which the queen's --webhook-deny refuses"));
        }
        if self.allow.iter().any(matches) {
            return Ok(());
        }
        match special_purpose(ip) {
            Some(kind) => Err(format!(
                "{ip} is a {kind} address: webhooks go to public addresses only, unless the queen's --webhook-allow \
                 names the range"
            )),
            None => Ok(()),
        }
    }

    /// Every address `host` resolves to (an address literal: itself) is allowed. The error is a sentence for
    /// the submitter.
    pub async fn check_host(&self, host: &url::Host<&str>, port: u16) -> Result<(), HostError> {
        let addrs = match host {
            url::Host::Ipv4(ip) => vec![IpAddr::V4(*ip)],
            url::Host::Ipv6(ip) => vec![IpAddr::V6(*ip)],
            url::Host::Domain(name) => resolve(name, port, &CHECK_LOOKUPS).await?,
        };
        for ip in addrs {
            self.check(ip).map_err(HostError::Refused)?;
        }
        Ok(())
    }
}

/// Why a host is not taken: refused (an address it resolves to, or it resolves to none), or not known yet
/// (every lookup place is taken, or the resolver is slow), which is no fault of the request's.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotKnownYet(String),
}

/// How many host lookups may run at once, for submissions' checks and for deliveries apart (so that hosts
/// submitted in a flood cannot hold up deliveries). The system resolver (getaddrinfo) blocks a thread of
/// tokio's blocking pool until it answers, which a timeout does not shorten: without a bound, submissions
/// naming hosts that never answer would each leave a thread waiting for the resolver's own timeout, and fill
/// the pool the object store's file I/O shares.
const MAX_LOOKUPS: usize = 16;
static CHECK_LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS);
static DELIVERY_LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS);

/// `name`'s addresses, looked up in one of `places` ([`CHECK_LOOKUPS`] or [`DELIVERY_LOOKUPS`]).
async fn resolve(name: &str, port: u16, places: &'static tokio::sync::Semaphore) -> Result<Vec<IpAddr>, HostError> {
    resolve_within(name, port, places, RESOLVE_TIMEOUT).await
}

/// [`resolve`], taking one of `places` for the lookup and waiting `patience` at most in all.
async fn resolve_within(
    name: &str,
    port: u16,
    places: &'static tokio::sync::Semaphore,
    patience: Duration,
) -> Result<Vec<IpAddr>, HostError> {
    let deadline = tokio::time::Instant::now() + patience;
    let place = tokio::time::timeout_at(deadline, places.acquire())
        .await
        .map_err(|_| {
            HostError::NotKnownYet(format!("{name} was not looked up: {MAX_LOOKUPS} lookups of webhook hosts are waiting for the system resolver; try again shortly"))
        })?
        .map_err(|e| HostError::NotKnownYet(e.to_string()))?;
    let host = name.to_string();
    // The lookup keeps its place until the resolver answers, also after this caller stopped waiting.
    let running = tokio::spawn(async move {
        let found = tokio::net::lookup_host((host.as_str(), port)).await;
        drop(place);
        found.map(|addrs| addrs.map(|a| a.ip()).collect::<Vec<_>>())
    });
    let ips = tokio::time::timeout_at(deadline, running)
        .await
        .map_err(|_| {
            HostError::NotKnownYet(format!(
                "{name} did not resolve within {}; try again shortly",
                humantime::format_duration(patience)
            ))
        })?
        .map_err(|e| HostError::NotKnownYet(format!("{name} was not looked up: {e}")))?
        .map_err(|e| HostError::Refused(format!("{name} does not resolve: {e}")))?;
    if ips.is_empty() {
        return Err(HostError::Refused(format!("{name} resolves to no address")));
    }
    Ok(ips)
}

/// An IPv4 address carried in IPv6 (mapped, NAT64, 6to4) as the IPv4 address it reaches.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| IpAddr::V4(Ipv4Addr::from(((hi as u32) << 16) | lo as u32));
            // 64:ff9b::/96 (NAT64) and 2002::/16 (6to4) reach the IPv4 address inside. (Local-use NAT64,
            // 64:ff9b:1::/48, may carry it at any of several places by the operator's prefix length: refused
            // as a special-purpose range instead.)
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return embedded(s[6], s[7]);
            }
            if s[0] == 0x2002 {
                return embedded(s[1], s[2]);
            }
            ip
        }
        v4 => v4,
    }
}

/// What kind of special-purpose address `ip` is (IANA's registries), if it is one.
fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            Some(match (a, b, c) {
                _ if v4.is_loopback() => "loopback",
                _ if v4.is_private() => "private",
                _ if v4.is_link_local() => "link-local",
                _ if v4.is_unspecified() || a == 0 => "this-network",
                _ if v4.is_broadcast() || a >= 240 => "reserved",
                _ if v4.is_multicast() => "multicast",
                (100, b, _) if (64..128).contains(&b) => "shared (carrier-grade NAT)",
                (192, 0, 0) => "IETF protocol",
                (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
                (198, 18 | 19, _) => "benchmarking",
                _ => return None,
            })
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            Some(match s[0] {
                _ if v6.is_loopback() => "loopback",
                _ if v6.is_unspecified() => "unspecified",
                _ if v6.is_multicast() => "multicast",
                x if x & 0xfe00 == 0xfc00 => "private (unique local)",
                x if x & 0xffc0 == 0xfe80 => "link-local",
                x if x & 0xffc0 == 0xfec0 => "site-local",
                0x2001 if s[1] == 0 => "Teredo",
                0x0064 if s[1..3] == [0xff9b, 1] => "local-use NAT64",
                0x2001 if s[1] == 0xdb8 => "documentation",
                0x0100 if s[1..4] == [0, 0, 0] => "discard-only",
                // IPv4-compatible (::a.b.c.d) and other addresses under ::/8.
                0 => "reserved",
                _ => return None,
            })
        }
    }
}

/// The HTTP client's resolver: a host's addresses, all allowed by the policy, else an error naming the
/// refused one (and nothing is connected to).
pub struct PolicyResolver(pub Arc<AddressPolicy>);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let ips = resolve(name.as_str(), 0, &DELIVERY_LOOKUPS).await?;
            for ip in &ips {
                policy.check(*ip)?;
            }
            let addrs: reqwest::dns::Addrs = Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// An address literal's `check` (the resolver never sees those).
pub fn check_literal(policy: &AddressPolicy, url: &url::Url) -> Result<(), String> {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => policy.check(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => policy.check(IpAddr::V6(ip)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn only_public_addresses_by_default() {
        let policy = AddressPolicy::default();
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "100.128.0.1", "172.32.0.1"] {
            assert!(policy.check(ip(public)).is_ok(), "{public}");
        }
        for (refused, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "this-network"),
            ("100.64.0.1", "carrier-grade"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("198.18.0.1", "benchmarking"),
            ("192.0.2.1", "documentation"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "unique local"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            // IPv4 inside IPv6 is judged as the IPv4 address it reaches.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("64:ff9b:1::a9fe:a9fe", "local-use NAT64"),
            // A /48 prefix puts the IPv4 address elsewhere: 8.8.8.8 where a /96 reads it is 10.0.0.1 here.
            ("64:ff9b:1:0a00:0:100:808:808", "local-use NAT64"),
            ("2002:c0a8:0101::1", "private"),
            ("::127.0.0.1", "reserved"),
            ("2001::1", "Teredo"),
        ] {
            let err = policy.check(ip(refused)).unwrap_err();
            assert!(err.contains(kind) && err.contains("--webhook-allow"), "{refused}: {err}");
        }
    }

    #[test]
    fn allow_exempts_a_range_and_deny_wins() {
        let policy = AddressPolicy {
            allow: AddressPolicy::parse_ranges(&["127.0.0.0/8".into(), "::1".into()], "--webhook-allow").unwrap(),
            deny: AddressPolicy::parse_ranges(&["127.0.0.9/32".into(), "93.184.0.0/16".into()], "--webhook-deny")
                .unwrap(),
        };
        assert!(policy.check(ip("127.0.0.1")).is_ok());
        assert!(policy.check(ip("::ffff:127.0.0.1")).is_ok(), "mapped: the same address");
        assert!(policy.check(ip("::1")).is_ok());
        assert!(policy.check(ip("10.0.0.1")).is_err(), "only the allowed range");
        assert!(policy.check(ip("127.0.0.9")).unwrap_err().contains("--webhook-deny"));
        assert!(policy.check(ip("93.184.216.34")).unwrap_err().contains("93.184.0.0/16"));
        let nat64 = AddressPolicy {
            deny: AddressPolicy::parse_ranges(&["64:ff9b::/96".into()], "--webhook-deny").unwrap(),
            ..Default::default()
        };
        assert!(nat64.check(ip("64:ff9b::5db8:d822")).is_err(), "a range written as IPv6 matches as written");
        assert!(nat64.check(ip("93.184.216.34")).is_ok());
        let err = AddressPolicy::parse_ranges(&["localhost".into()], "--webhook-allow").unwrap_err();
        assert!(err.to_string().contains("--webhook-allow \"localhost\""), "{err}");
    }

    #[tokio::test]
    async fn hosts_are_judged_by_every_address_they_resolve_to() {
        let policy = AddressPolicy::default();
        let url = url::Url::parse("http://localhost:9/hook").unwrap();
        let err = policy.check_host(&url.host().unwrap(), 9).await.unwrap_err();
        assert!(matches!(&err, HostError::Refused(e) if e.contains("loopback")), "{err}");
        let literal = url::Url::parse("http://[::ffff:192.168.0.1]/").unwrap();
        assert!(check_literal(&policy, &literal).unwrap_err().contains("private"));
        let err = policy.check_host(&url::Host::Domain("no-such-host.invalid"), 80).await.unwrap_err();
        assert!(matches!(&err, HostError::Refused(e) if e.contains("does not resolve")), "{err}");
    }
    #[tokio::test]
    async fn lookups_wait_for_a_place_and_give_up_in_time() {
        let places: &'static tokio::sync::Semaphore = Box::leak(Box::new(tokio::sync::Semaphore::new(1)));
        let patience = Duration::from_millis(300);
        let busy = places.acquire().await.unwrap();
        let started = std::time::Instant::now();
        let err = resolve_within("localhost", 80, places, patience).await.unwrap_err();
        assert!(
            matches!(&err, HostError::NotKnownYet(e) if e.starts_with("localhost was not looked up: 16 lookups")),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        drop(busy);
        let ips = resolve_within("localhost", 80, places, Duration::from_secs(5)).await.unwrap();
        assert!(ips.iter().all(|ip| ip.is_loopback()), "{ips:?}");
        assert_eq!(places.available_permits(), 1, "the lookup gave its place back");
    }
}
