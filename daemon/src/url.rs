//! Broker addresses: `mqtt://host[:port]`, `tcp://host[:port]` or `mqtts://host[:port]`.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A parsed broker address. Ports default to 1883 (plain) and 8883 (TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::BrokerUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
        {
            (false, r)
        } else {
            return Err(bad("must start with mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("bad port"))?),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(BrokerUrl {
            tls,
            host: host.to_string(),
            port,
        })
    }
}

impl FromStr for BrokerUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(tls: bool, host: &str, port: u16) -> BrokerUrl {
        BrokerUrl {
            tls,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_schemes_and_default_ports() {
        assert_eq!(
            BrokerUrl::parse("mqtt://127.0.0.1:1884").unwrap(),
            url(false, "127.0.0.1", 1884)
        );
        assert_eq!(
            BrokerUrl::parse("tcp://broker/").unwrap(),
            url(false, "broker", 1883)
        );
        assert_eq!(
            BrokerUrl::parse("mqtts://broker").unwrap(),
            url(true, "broker", 8883)
        );
        let u = BrokerUrl::parse("mqtts://b:9").unwrap();
        assert_eq!(u.to_string().parse::<BrokerUrl>().unwrap(), u);
    }

    #[test]
    fn rejects_what_it_cannot_connect_to() {
        for bad in [
            "http://x",
            "broker:1883",
            "mqtt://x:notaport",
            "mqtt://:1883",
            "mqtt://",
        ] {
            assert!(
                matches!(BrokerUrl::parse(bad), Err(Error::BrokerUrl { .. })),
                "{bad}"
            );
        }
    }
}
