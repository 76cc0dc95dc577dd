//! PROXY protocol v1 (text) and v2 (binary) headers, as sent to a backend before any byte of the
//! client's stream. Pure functions: no I/O.
//!
//! Address families must match within one header; when one side is IPv4 and the other IPv6, the
//! IPv4 address is written as an IPv4-mapped IPv6 address. Health checks send the `LOCAL` form (v2)
//! or `UNKNOWN` (v1), which tells the backend that the connection carries no client.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte v2 signature.
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V6(_)) => (
            SocketAddr::new(IpAddr::V6(s.to_ipv6_mapped()), src.port()),
            dst,
        ),
        (IpAddr::V6(_), IpAddr::V4(d)) => (
            src,
            SocketAddr::new(IpAddr::V6(d.to_ipv6_mapped()), dst.port()),
        ),
        _ => (src, dst),
    }
}

/// `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` (or TCP6).
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// The v1 header of a connection that carries no client (health checks).
pub fn encode_v1_unknown() -> Vec<u8> {
    b"PROXY UNKNOWN\r\n".to_vec()
}

/// v2 `PROXY` command over TCP (`\x21`), family TCP4 (`\x11`) or TCP6 (`\x21`).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        // same_family() leaves no mixed pair.
        _ => {
            return encode_v2_local();
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// v2 `LOCAL` command (`\x20`), family UNSPEC, no addresses (health checks).
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&V2_SIGNATURE);
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_exact() {
        assert_eq!(
            encode_v1(sa("192.168.0.1:56324"), sa("192.168.0.11:443")),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec()
        );
    }

    #[test]
    fn v1_tcp6_exact() {
        assert_eq!(
            encode_v1(sa("[2001:db8::1]:1000"), sa("[::1]:5672")),
            b"PROXY TCP6 2001:db8::1 ::1 1000 5672\r\n".to_vec()
        );
    }

    #[test]
    fn v1_mixed_family_maps_v4() {
        assert_eq!(
            encode_v1(sa("10.0.0.1:1"), sa("[::1]:2")),
            b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n".to_vec()
        );
    }

    #[test]
    fn v1_fits_the_108_byte_limit() {
        let h = encode_v1(
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        );
        assert!(h.len() <= 107, "{}", h.len());
        assert_eq!(encode_v1_unknown(), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_tcp4_exact() {
        let h = encode_v2(sa("127.0.0.1:1234"), sa("10.1.2.3:5672"));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        want.extend_from_slice(&[127, 0, 0, 1, 10, 1, 2, 3]);
        want.extend_from_slice(&[0x04, 0xD2, 0x16, 0x28]);
        assert_eq!(h, want);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn v2_tcp6_exact() {
        let h = encode_v2(sa("[::1]:80"), sa("[2001:db8::2]:443"));
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0x00, 36]);
        let mut src = [0u8; 16];
        src[15] = 1;
        assert_eq!(&h[16..32], &src);
        assert_eq!(&h[32..34], &[0x20, 0x01]);
        assert_eq!(&h[46..48], &[0x00, 0x02]);
        assert_eq!(&h[48..52], &[0x00, 80, 0x01, 0xBB]);
        assert_eq!(h.len(), 52);
    }

    #[test]
    fn v2_local_exact() {
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(encode_v2_local(), want);
    }
}
