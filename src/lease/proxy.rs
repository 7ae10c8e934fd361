//! Which proxy, if any, carries the connection to the API server: the rule kubectl follows
//! (client-go's transport, Go's `net/http`), decided here as a pure function of the server's URL,
//! the kubeconfig's `proxy-url` and the environment.
//!
//! - The kubeconfig cluster's `proxy-url` (`http://`, `https://` or `socks5://`) is used for
//!   every connection to that cluster, whatever the environment says.
//! - Otherwise `HTTPS_PROXY` for an `https://` server and `HTTP_PROXY` for an `http://` one (the
//!   upper-case name first, then the lower-case one), unless `NO_PROXY` covers the server's host
//!   (a name and its subdomains, `.suffix`, an address, a CIDR block, or `*`). As in Go, `localhost`
//!   and loopback addresses are never sent to a proxy named by the environment.
//! - An `http(s)://` proxy is asked to `CONNECT` (also for an `http://` server); `socks5://` sends
//!   the server's name to the proxy, which resolves it (Go's behaviour). `user:password@` in the
//!   proxy's URL becomes `Proxy-Authorization: Basic` or the SOCKS5 username and password.
//!
//! kube reads `HTTPS_PROXY` into `Config::proxy_url` as if the kubeconfig had named it: a
//! `proxy_url` equal to the environment's is taken as the environment's (so `NO_PROXY` applies),
//! which differs from kubectl only when the kubeconfig names that very proxy and `NO_PROXY` covers
//! the server.

use hyper::http::Uri;
use hyper_util::client::proxy::matcher::{Intercept, Matcher};

/// Where a proxy came from, named in logs and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Kubeconfig,
    Env(&'static str),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Kubeconfig => write!(f, "the kubeconfig's proxy-url"),
            Source::Env(name) => write!(f, "{name}"),
        }
    }
}

/// The proxy for the connection to the API server.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub intercept: Intercept,
    pub source: Source,
}

impl Proxy {
    /// `http`, `https` or `socks5`.
    pub fn scheme(&self) -> &str {
        self.intercept.uri().scheme_str().unwrap_or("http")
    }
}

/// The first of `names` set to something non-empty in `env`, with its name.
fn first(
    env: &dyn Fn(&str) -> Option<String>,
    names: [&'static str; 2],
) -> Option<(&'static str, String)> {
    names.into_iter().find_map(|name| {
        env(name)
            .filter(|v| !v.trim().is_empty())
            .map(|v| (name, v))
    })
}

/// `value` with the password of any `user:password@` replaced, for messages.
pub fn redacted(value: &str) -> String {
    let (scheme, rest) = value.split_once("://").unwrap_or(("", value));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let prefix = if scheme.is_empty() {
                String::new()
            } else {
                format!("{scheme}://")
            };
            format!("{prefix}{user}:***@{host}{}", &rest[authority_end..])
        }
        None => value.to_string(),
    }
}

/// Checks a proxy URL as written: a scheme lease-exec can speak and a host; a SOCKS5 proxy
/// without a port gets 1080, as in Go (an http(s) one gets 80 or 443 from its scheme).
pub fn usable(source: Source, value: &str) -> Result<Intercept, String> {
    let shown = redacted(value);
    let mut with_scheme = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let uri: Uri = with_scheme.parse().map_err(|e| {
        format!("{source}={shown:?} is not a proxy URL ({e}): use http://HOST:PORT, https://HOST:PORT or socks5://HOST:PORT")
    })?;
    let scheme = uri.scheme_str().unwrap_or_default();
    if !matches!(scheme, "http" | "https" | "socks5" | "socks5h") {
        return Err(format!(
            "{source}={shown:?}: lease-exec speaks to http, https and socks5 proxies, not {scheme}: use one of those"
        ));
    }
    if scheme.starts_with("socks5")
        && uri.port().is_none()
        && let Some(authority) = uri.authority()
    {
        with_scheme = format!("{scheme}://{authority}:1080");
    }
    // The matcher parses the credentials; the same URL for both schemes of server.
    Matcher::builder()
        .http(with_scheme.clone())
        .https(with_scheme)
        .build()
        .intercept(&"https://api-server".parse::<Uri>().expect("a URL"))
        .ok_or_else(|| format!("{source}={shown:?} names no host: use http://HOST:PORT"))
}

/// Whether `host` (as in a URL, IPv6 in brackets) is `localhost` or a loopback address.
fn loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The proxy for `server`: `kubeconfig` (the kubeconfig's `proxy-url`, as kube read it) or the
/// environment `env` gives. `Ok(None)`: connect directly.
pub fn route(
    server: &Uri,
    kubeconfig: Option<&Uri>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Proxy>, String> {
    let https = first(env, ["HTTPS_PROXY", "https_proxy"]);
    // kube fills `proxy_url` from HTTPS_PROXY when the kubeconfig names none.
    let from_kubeconfig = kubeconfig.filter(|url| {
        https
            .as_ref()
            .is_none_or(|(_, value)| value.parse::<Uri>().ok().as_ref() != Some(*url))
    });
    if let Some(url) = from_kubeconfig {
        let intercept = usable(Source::Kubeconfig, &url.to_string())?;
        return Ok(Some(Proxy {
            intercept,
            source: Source::Kubeconfig,
        }));
    }
    let (name, value) = match server.scheme_str() {
        Some("http") => match first(env, ["HTTP_PROXY", "http_proxy"]) {
            Some(found) => found,
            None => return Ok(None),
        },
        _ => match https {
            Some(found) => found,
            None => return Ok(None),
        },
    };
    let intercept = usable(Source::Env(name), &value)?;
    let host = server.host().unwrap_or_default();
    if loopback(host) {
        return Ok(None);
    }
    // Go takes `*.example` as `.example`.
    let no = first(env, ["NO_PROXY", "no_proxy"])
        .map(|(_, v)| {
            v.split(',')
                .map(|entry| {
                    let entry = entry.trim();
                    entry
                        .strip_prefix("*.")
                        .map_or(entry.to_string(), |rest| format!(".{rest}"))
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    // The matcher applies NO_PROXY (curl's rules, which Go's follow: names with their
    // subdomains, `.suffix`, addresses, CIDR blocks, `*`).
    let covered = Matcher::builder()
        .http(value.clone())
        .https(value)
        .no(no)
        .build()
        .intercept(server)
        .is_none();
    Ok((!covered).then_some(Proxy {
        intercept,
        source: Source::Env(name),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    fn via(server: &str, kubeconfig: Option<&str>, vars: &[(&str, &str)]) -> Option<String> {
        let server: Uri = server.parse().unwrap();
        let kubeconfig: Option<Uri> = kubeconfig.map(|k| k.parse().unwrap());
        route(&server, kubeconfig.as_ref(), &env(vars))
            .unwrap()
            .map(|p| format!("{} from {}", p.intercept.uri(), p.source))
    }

    #[test]
    fn the_environment_names_the_proxy_by_the_servers_scheme() {
        let vars = [
            ("HTTPS_PROXY", "http://secure:3128"),
            ("HTTP_PROXY", "http://plain:3128"),
        ];
        assert_eq!(
            via("https://api.example:6443", None, &vars).as_deref(),
            Some("http://secure:3128/ from HTTPS_PROXY")
        );
        assert_eq!(
            via("http://api.example:8080", None, &vars).as_deref(),
            Some("http://plain:3128/ from HTTP_PROXY")
        );
        // Lower case when upper case is absent; upper case first.
        assert_eq!(
            via("https://api.example", None, &[("https_proxy", "lower:1")]).as_deref(),
            Some("http://lower:1/ from https_proxy")
        );
        assert_eq!(
            via(
                "https://api.example",
                None,
                &[("https_proxy", "lower:1"), ("HTTPS_PROXY", "upper:1")]
            )
            .as_deref(),
            Some("http://upper:1/ from HTTPS_PROXY")
        );
        assert_eq!(via("https://api.example", None, &[]), None);
        assert_eq!(
            via("https://api.example", None, &[("HTTP_PROXY", "p:1")]),
            None
        );
    }

    #[test]
    fn no_proxy_and_loopback_go_direct() {
        let proxy = ("HTTPS_PROXY", "http://proxy:3128");
        for no in [
            "api.example",
            ".example",
            "*.example",
            "example",
            "10.0.0.0/8",
            "*",
            "other, api.example",
        ] {
            let server = if no.contains('/') {
                "https://10.1.2.3:6443"
            } else {
                "https://api.example:6443"
            };
            assert_eq!(
                via(server, None, &[proxy, ("NO_PROXY", no)]),
                None,
                "NO_PROXY={no} covers {server}"
            );
        }
        assert!(
            via(
                "https://api.example",
                None,
                &[proxy, ("NO_PROXY", "other.example")]
            )
            .is_some()
        );
        assert!(
            via(
                "https://10.1.2.3",
                None,
                &[proxy, ("no_proxy", "192.168.0.0/16")]
            )
            .is_some()
        );
        for server in [
            "https://127.0.0.1:6443",
            "https://localhost:6443",
            "https://[::1]:6443",
        ] {
            assert_eq!(via(server, None, &[proxy]), None, "{server} is loopback");
        }
    }

    #[test]
    fn the_kubeconfigs_proxy_url_is_used_whatever_the_environment_says() {
        let vars = [("NO_PROXY", "*"), ("HTTPS_PROXY", "http://env:1")];
        assert_eq!(
            via("https://127.0.0.1:6443", Some("socks5://socks:1080"), &vars).as_deref(),
            Some("socks5://socks:1080/ from the kubeconfig's proxy-url")
        );
        // kube copies HTTPS_PROXY into proxy_url: that one is the environment's.
        assert_eq!(
            via("https://api.example", Some("http://env:1"), &vars),
            None
        );
    }

    #[test]
    fn credentials_in_the_proxy_url_are_taken() {
        let server: Uri = "https://api.example".parse().unwrap();
        let http = route(
            &server,
            None,
            &env(&[("HTTPS_PROXY", "http://us%40er:pa%3Ass@p:1")]),
        )
        .unwrap()
        .unwrap();
        let basic = http.intercept.basic_auth().expect("basic credentials");
        // base64("us@er:pa:ss")
        assert_eq!(basic.to_str().unwrap(), "Basic dXNAZXI6cGE6c3M=");
        let socks: Uri = "socks5://user:secret@s:1080".parse().unwrap();
        let socks = route(&server, Some(&socks), &env(&[])).unwrap().unwrap();
        assert_eq!(socks.intercept.raw_auth(), Some(("user", "secret")));
        assert_eq!(socks.scheme(), "socks5");
    }

    #[test]
    fn a_socks5_proxy_without_a_port_is_on_1080_and_passwords_are_never_shown() {
        let server: Uri = "https://api.example".parse().unwrap();
        let socks: Uri = "socks5://s".parse().unwrap();
        let proxy = route(&server, Some(&socks), &env(&[])).unwrap().unwrap();
        assert_eq!(proxy.intercept.uri().port_u16(), Some(1080));
        let e = route(
            &server,
            None,
            &env(&[("HTTPS_PROXY", "http://user:s3cret@bad host:1")]),
        )
        .unwrap_err();
        assert!(!e.contains("s3cret") && e.contains("user:***@"), "{e}");
        assert_eq!(redacted("http://p:1"), "http://p:1");
        assert_eq!(redacted("u:pw@p:1"), "u:***@p:1");
    }

    #[test]
    fn an_unusable_proxy_is_named_with_the_fix() {
        let server: Uri = "https://api.example".parse().unwrap();
        let e = route(&server, None, &env(&[("HTTPS_PROXY", "ftp://p:21")])).unwrap_err();
        assert!(e.contains("HTTPS_PROXY") && e.contains("ftp"), "{e}");
        let e = route(&server, None, &env(&[("HTTPS_PROXY", "http://bad host")])).unwrap_err();
        assert!(
            e.contains("HTTPS_PROXY") && e.contains("not a proxy URL"),
            "{e}"
        );
    }
}
