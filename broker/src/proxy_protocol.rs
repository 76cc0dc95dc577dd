//! PROXY protocol v1 (text) and v2 (binary) headers, as a load balancer (warren-lb, HAProxy, AWS
//! ELB) sends them before the first byte of the client's stream, and the trust list of addresses
//! allowed to send them. Pure: no I/O, no clock; the accept path in [`crate::proxied`] feeds it
//! bytes.
//!
//! [`parse`] follows the house rule for codecs: a valid header that is still incomplete answers
//! `Ok(None)` (need more bytes), so the caller reads on; anything that can no longer become a
//! valid header is an error as soon as the received prefix shows it. Bytes after the header are
//! not touched: a client may send the header and the AMQP protocol header in one segment.
//!
//! Bounds (decided before anything is buffered past them): a v1 line is at most 107 bytes, the
//! spec's limit; a v2 header's TLV section (after the addresses) at most [`V2_MAX_TLV`] bytes,
//! well below the 64 KiB the length field could announce.
//!
//! What the broker does with each form:
//! - v1 `TCP4`/`TCP6`, v2 `PROXY` over TCP/IPv4 or TCP/IPv6: [`ProxyHeader::Proxied`]; the client's
//!   address replaces the socket's everywhere (guest loopback rule, names, API).
//! - v1 `UNKNOWN`, v2 `LOCAL` (any family), v2 `PROXY` with family `UNSPEC`:
//!   [`ProxyHeader::Local`]; the balancer speaks for itself (health checks), the socket's own
//!   addresses stay, as the spec asks.
//! - v2 `PROXY` over UNIX sockets or datagrams: refused. There is no IP address to stand for the
//!   client, and keeping the balancer's (often loopback) address would hand the client its rights.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 header, CRLF included (spec section 2.1).
pub const V1_MAX: usize = 107;
/// The 12-byte v2 signature.
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// The fixed part of a v2 header: signature, version/command, family, length.
pub const V2_FIXED: usize = 16;
/// The most TLV bytes (after the address block) a v2 header may carry here.
pub const V2_MAX_TLV: usize = 4096;

const V1_PREFIX: &[u8] = b"PROXY ";

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The balancer relays a client: `src` is the client, `dst` the address the client reached.
    Proxied { src: SocketAddr, dst: SocketAddr },
    /// The connection carries no client (v2 `LOCAL`, v1 `UNKNOWN`, v2 family `UNSPEC`): keep the
    /// socket's own addresses.
    Local,
}

/// Why bytes are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 header longer than {V1_MAX} bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
    #[error("PROXY v2 header with {0} bytes of TLVs (at most {V2_MAX_TLV})")]
    V2TooLarge(usize),
}

/// Parses a PROXY header at the start of `buf`: `Ok(Some((header, consumed)))` when complete,
/// `Ok(None)` when `buf` is a valid but incomplete prefix, an error otherwise.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(0x0D) => parse_v2(buf),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

// === v1 ===

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(ProxyError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        // Only printable ASCII, and a CR only as the last byte received so far.
        let bad = window.iter().enumerate().any(|(i, &b)| {
            let printable = (b' '..=b'~').contains(&b);
            let trailing_cr = b == b'\r' && i + 1 == buf.len();
            !(printable || trailing_cr)
        });
        if bad {
            return Err(ProxyError::V1("not printable ASCII"));
        }
        if buf.len() >= V1_MAX {
            return Err(ProxyError::V1TooLong);
        }
        return Ok(None);
    };
    if lf < V1_PREFIX.len() || window[lf - 1] != b'\r' {
        return Err(ProxyError::V1("line does not end with CRLF"));
    }
    let line = &window[V1_PREFIX.len()..lf - 1];
    if !line.iter().all(|b| (b' '..=b'~').contains(b)) {
        return Err(ProxyError::V1("not printable ASCII"));
    }
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1("not printable ASCII"))?;
    let header = parse_v1_line(line)?;
    Ok(Some((header, lf + 1)))
}

/// The part after `PROXY ` and before CRLF.
fn parse_v1_line(line: &str) -> Result<ProxyHeader, ProxyError> {
    // UNKNOWN may be followed by anything (the receiver must ignore it).
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok(ProxyHeader::Local);
    }
    let f: Vec<&str> = line.split(' ').collect();
    let [proto, src, dst, sport, dport] = f[..] else {
        return Err(ProxyError::V1(
            "expected protocol, two addresses and two ports",
        ));
    };
    let (src, dst) = match proto {
        "TCP4" => (
            IpAddr::V4(src.parse::<Ipv4Addr>().map_err(|_| bad_addr())?),
            IpAddr::V4(dst.parse::<Ipv4Addr>().map_err(|_| bad_addr())?),
        ),
        "TCP6" => (
            IpAddr::V6(src.parse::<Ipv6Addr>().map_err(|_| bad_addr())?),
            IpAddr::V6(dst.parse::<Ipv6Addr>().map_err(|_| bad_addr())?),
        ),
        _ => return Err(ProxyError::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(ProxyHeader::Proxied {
        src: SocketAddr::new(src, v1_port(sport)?),
        dst: SocketAddr::new(dst, v1_port(dport)?),
    })
}

fn bad_addr() -> ProxyError {
    ProxyError::V1("bad address for the protocol")
}

fn v1_port(s: &str) -> Result<u16, ProxyError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyError::V1("bad port"));
    }
    s.parse().map_err(|_| ProxyError::V1("bad port"))
}

// === v2 ===

/// Size of the address block of a v2 family/transport byte, for the families the spec defines.
fn v2_addr_len(fam: u8) -> Option<usize> {
    match fam {
        0x00 => Some(0),
        0x11 | 0x12 => Some(12),
        0x21 | 0x22 => Some(36),
        0x31 | 0x32 => Some(216),
        _ => None,
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyError::NotProxy);
    }
    // Each fixed byte is judged as soon as it arrives.
    let local = match buf.get(12) {
        None => return Ok(None),
        Some(v) if v >> 4 != 2 => return Err(ProxyError::V2("version is not 2")),
        Some(0x20) => true,
        Some(0x21) => false,
        Some(_) => return Err(ProxyError::V2("command is not LOCAL or PROXY")),
    };
    let Some(&fam) = buf.get(13) else {
        return Ok(None);
    };
    let addr_len = match (local, v2_addr_len(fam)) {
        // LOCAL: the address block, whatever its family, is ignored.
        (true, known) => known.unwrap_or(0),
        (false, Some(len)) if matches!(fam, 0x00 | 0x11 | 0x21) => len,
        (false, _) => {
            return Err(ProxyError::V2(
                "PROXY over a transport other than TCP/IPv4 or TCP/IPv6",
            ))
        }
    };
    if buf.len() < V2_FIXED {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len < addr_len {
        return Err(ProxyError::V2("length shorter than the address block"));
    }
    let tlv = len - addr_len;
    if tlv > V2_MAX_TLV {
        return Err(ProxyError::V2TooLarge(tlv));
    }
    let total = V2_FIXED + len;
    if buf.len() < total {
        return Ok(None);
    }
    if local {
        return Ok(Some((ProxyHeader::Local, total)));
    }
    let a = &buf[V2_FIXED..total];
    let header = match fam {
        0x11 => {
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            ProxyHeader::Proxied {
                src: SocketAddr::new(ip(0), port(8)),
                dst: SocketAddr::new(ip(4), port(10)),
            }
        }
        0x21 => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            ProxyHeader::Proxied {
                src: SocketAddr::new(ip(0), port(32)),
                dst: SocketAddr::new(ip(16), port(34)),
            }
        }
        // UNSPEC: "the receiver ... must use the real connection endpoints".
        _ => ProxyHeader::Local,
    };
    Ok(Some((header, total)))
}

// === trust list ===

/// An address range (`10.0.0.0/8`, `::1/128`, or a bare address) of `proxy-protocol-from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `addr/prefix`; the address must have no bits set past the prefix.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!(
                "'{addr}/{prefix}': prefix length {prefix} is more than {max}"
            ));
        }
        if let IpAddr::V6(v6) = addr {
            if v6.to_ipv4_mapped().is_some() && prefix >= 96 {
                return Err(format!(
                    "'{addr}/{prefix}': write IPv4-mapped addresses as IPv4 ({}/{})",
                    v6.to_canonical(),
                    prefix - 96
                ));
            }
        }
        let c = Self { addr, prefix };
        if c.masked() != addr {
            return Err(format!(
                "'{addr}/{prefix}' has bits set past the prefix (did you mean {}/{prefix}?)",
                c.masked()
            ));
        }
        Ok(c)
    }

    fn masked(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & v4_mask(self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & v6_mask(self.prefix))),
        }
    }

    /// Whether `ip` is in the range. An IPv4-mapped IPv6 address (a dual-stack socket's view of
    /// an IPv4 client) counts as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & v4_mask(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & v6_mask(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }

    /// The default trust list: loopback only (127.0.0.0/8 and ::1).
    pub fn loopback() -> Vec<Cidr> {
        vec![
            Cidr {
                addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
                prefix: 8,
            },
            Cidr {
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                prefix: 128,
            },
        ]
    }
}

fn v4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (ip, prefix) = match t.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (t, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| {
            format!("'{t}' is not an IP address or CIDR range (such as 10.0.0.0/8 or ::1/128)")
        })?;
        let prefix = match prefix {
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| format!("'{t}': prefix length '{p}' is not a number"))?,
        };
        Self::new(addr, prefix)
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("proxy-protocol-from: {e}")))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Whether `ip` is in any range of `list`.
pub fn trusted(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn proxied(src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader::Proxied {
            src: sa(src),
            dst: sa(dst),
        }
    }

    /// Every proper prefix of a valid header is "need more bytes".
    fn every_truncation_is_incomplete(h: &[u8]) {
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Ok(None), "prefix of {n} bytes of {h:?}");
        }
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(cmd);
        h.push(fam);
        h.extend_from_slice(&u16::try_from(body.len()).expect("len").to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v1_tcp4() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.5 56324 5672\r\n";
        assert_eq!(
            parse(h),
            Ok(Some((
                proxied("203.0.113.7:56324", "10.0.0.5:5672"),
                h.len()
            )))
        );
        every_truncation_is_incomplete(h);
    }

    #[test]
    fn v1_tcp6_and_mapped() {
        let h = b"PROXY TCP6 2001:db8::1 ::1 1000 5672\r\n";
        assert_eq!(
            parse(h),
            Ok(Some((proxied("[2001:db8::1]:1000", "[::1]:5672"), h.len())))
        );
        every_truncation_is_incomplete(h);
        // warren-lb writes an IPv4 client behind an IPv6 listener this way.
        let h = b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n";
        assert_eq!(
            parse(h),
            Ok(Some((proxied("[::ffff:10.0.0.1]:1", "[::1]:2"), h.len())))
        );
    }

    #[test]
    fn v1_longest_header_fits() {
        let h = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(h.len(), 104);
        assert!(matches!(
            parse(h),
            Ok(Some((ProxyHeader::Proxied { .. }, 104)))
        ));
        every_truncation_is_incomplete(h);
        let h = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(h.len(), V1_MAX);
        assert_eq!(parse(h), Ok(Some((ProxyHeader::Local, V1_MAX))));
        every_truncation_is_incomplete(h);
    }

    #[test]
    fn v1_unknown_keeps_the_socket_addresses() {
        for h in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ] {
            assert_eq!(parse(h), Ok(Some((ProxyHeader::Local, h.len()))));
            every_truncation_is_incomplete(h);
        }
    }

    #[test]
    fn bytes_after_the_header_are_left_alone() {
        let mut buf = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec();
        let n = buf.len();
        buf.extend_from_slice(b"AMQP\x00\x00\x09\x01");
        assert_eq!(
            parse(&buf),
            Ok(Some((proxied("1.2.3.4:1", "5.6.7.8:2"), n)))
        );
        let mut buf = v2(0x20, 0x00, &[]);
        buf.extend_from_slice(b"AMQP\x00\x00\x09\x01");
        assert_eq!(parse(&buf), Ok(Some((ProxyHeader::Local, 16))));
    }

    #[test]
    fn v1_garbage_is_an_error() {
        for h in [
            &b"AMQP\x00\x00\x09\x01"[..],
            b"GET / HTTP/1.1\r\n",
            b"PROXX",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\x005.6.7.8",
            b"PROXY \xff",
            b"PROXY\r\n",
        ] {
            assert!(parse(h).is_err(), "{:?}", String::from_utf8_lossy(h));
        }
    }

    #[test]
    fn v1_without_crlf_in_107_bytes_is_too_long() {
        let mut h = b"PROXY UNKNOWN ".to_vec();
        h.resize(V1_MAX - 1, b'x');
        assert_eq!(parse(&h), Ok(None));
        h.push(b'x');
        assert_eq!(parse(&h), Err(ProxyError::V1TooLong));
        // A CRLF past the limit does not make it valid.
        h.extend_from_slice(b"\r\n");
        assert_eq!(parse(&h), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v2_proxy_ipv4() {
        let mut body = vec![203, 0, 113, 7, 10, 0, 0, 5];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&5672u16.to_be_bytes());
        let h = v2(0x21, 0x11, &body);
        assert_eq!(
            parse(&h),
            Ok(Some((proxied("203.0.113.7:56324", "10.0.0.5:5672"), 28)))
        );
        every_truncation_is_incomplete(&h);
    }

    #[test]
    fn v2_proxy_ipv6_with_tlvs() {
        let src: Ipv6Addr = "2001:db8::7".parse().expect("ip");
        let dst: Ipv6Addr = "2001:db8::1".parse().expect("ip");
        let mut body = src.octets().to_vec();
        body.extend_from_slice(&dst.octets());
        body.extend_from_slice(&[0x04, 0xD2, 0x16, 0x28]);
        // A PP2_TYPE_AUTHORITY TLV: skipped.
        body.extend_from_slice(&[0x02, 0x00, 0x03, b'a', b'.', b'b']);
        let h = v2(0x21, 0x21, &body);
        assert_eq!(
            parse(&h),
            Ok(Some((
                proxied("[2001:db8::7]:1234", "[2001:db8::1]:5672"),
                h.len()
            )))
        );
        every_truncation_is_incomplete(&h);
    }

    #[test]
    fn v2_local_and_unspec_keep_the_socket_addresses() {
        let h = v2(0x20, 0x00, &[]);
        assert_eq!(parse(&h), Ok(Some((ProxyHeader::Local, 16))));
        every_truncation_is_incomplete(&h);
        // LOCAL with an address block (ignored) and PROXY over UNSPEC.
        let h = v2(0x20, 0x11, &[1; 12]);
        assert_eq!(parse(&h), Ok(Some((ProxyHeader::Local, 28))));
        let h = v2(0x21, 0x00, &[]);
        assert_eq!(parse(&h), Ok(Some((ProxyHeader::Local, 16))));
    }

    #[test]
    fn v2_garbage_is_an_error() {
        let ok4 = [1u8; 12];
        for (what, h) in [
            ("bad signature", {
                let mut h = v2(0x21, 0x11, &ok4);
                h[5] = 0x01;
                h
            }),
            ("version 1", v2(0x11, 0x11, &ok4)),
            ("command 2", v2(0x22, 0x11, &ok4)),
            ("UNIX", v2(0x21, 0x31, &[0; 216])),
            ("UDP", v2(0x21, 0x12, &ok4)),
            ("unknown family", v2(0x21, 0x41, &ok4)),
            ("short address block", v2(0x21, 0x11, &[1; 11])),
            ("short IPv6 block", v2(0x21, 0x21, &[1; 12])),
        ] {
            assert!(parse(&h).is_err(), "{what}");
        }
        // Errors show up before the whole header is in.
        assert!(parse(&v2(0x11, 0x11, &ok4)[..13]).is_err());
        assert!(parse(&v2(0x21, 0x31, &ok4)[..14]).is_err());
    }

    #[test]
    fn v2_oversize_tlvs_are_refused_from_the_fixed_part() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        h.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&h), Err(ProxyError::V2TooLarge(65535 - 12)));
        let h = v2(0x21, 0x11, &vec![0; 12 + V2_MAX_TLV]);
        assert!(matches!(parse(&h), Ok(Some(_))));
        let h = v2(0x21, 0x11, &vec![0; 12 + V2_MAX_TLV + 1]);
        assert_eq!(parse(&h[..16]), Err(ProxyError::V2TooLarge(V2_MAX_TLV + 1)));
        let h = v2(0x20, 0x00, &vec![0; V2_MAX_TLV + 1]);
        assert_eq!(parse(&h[..16]), Err(ProxyError::V2TooLarge(V2_MAX_TLV + 1)));
    }

    #[test]
    fn compatible_with_what_warren_lb_sends() {
        // Byte-exact copies of warren-lb's encoder output (lb/src/proxy_protocol.rs tests).
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        h.extend_from_slice(&[127, 0, 0, 1, 10, 1, 2, 3]);
        h.extend_from_slice(&[0x04, 0xD2, 0x16, 0x28]);
        assert_eq!(
            parse(&h),
            Ok(Some((proxied("127.0.0.1:1234", "10.1.2.3:5672"), 28)))
        );
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&h), Ok(Some((ProxyHeader::Local, 16))));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use proptest::prelude::*;
        // Valid starts make the parser go further than the first byte.
        proptest!(|(data in proptest::collection::vec(any::<u8>(), 0..300), pick in 0u8..3)| {
            let mut buf = match pick {
                0 => V2_SIGNATURE.to_vec(),
                1 => V1_PREFIX.to_vec(),
                _ => Vec::new(),
            };
            buf.extend_from_slice(&data);
            if let Ok(Some((_, n))) = parse(&buf) {
                prop_assert!(n <= buf.len());
            }
        });
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(c.contains("10.255.0.1".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        // A dual-stack socket's view of an IPv4 client.
        assert!(c.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!c.contains("::1".parse().expect("ip")));
        let one: Cidr = "192.0.2.4".parse().expect("bare ip");
        assert_eq!(one.to_string(), "192.0.2.4/32");
        assert!(one.contains("192.0.2.4".parse().expect("ip")));
        assert!(!one.contains("192.0.2.5".parse().expect("ip")));
        let v6: Cidr = "2001:db8::/32".parse().expect("v6");
        assert!(v6.contains("2001:db8:1::1".parse().expect("ip")));
        assert!(!v6.contains("2001:db9::1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("all v4");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        let all6: Cidr = "::/0".parse().expect("all v6");
        assert!(all6.contains("::1".parse().expect("ip")));
        assert!(!all6.contains("8.8.8.8".parse().expect("ip")));
        let lo = Cidr::loopback();
        assert!(trusted(&lo, "127.0.0.1".parse().expect("ip")));
        assert!(trusted(&lo, "127.9.9.9".parse().expect("ip")));
        assert!(trusted(&lo, "::1".parse().expect("ip")));
        assert!(trusted(&lo, "::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!trusted(&lo, "10.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn bad_cidrs_say_why() {
        for (s, want) in [
            ("10.0.0.0/33", "more than 32"),
            ("::/129", "more than 128"),
            ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("10.0.0.0/x", "not a number"),
            ("10.0.0/8", "not an IP address"),
            ("localhost", "not an IP address"),
            (
                "::ffff:10.0.0.0/104",
                "write IPv4-mapped addresses as IPv4 (10.0.0.0/8)",
            ),
        ] {
            let e = s.parse::<Cidr>().expect_err(s);
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
