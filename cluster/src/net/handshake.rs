//! Mutual authentication of a new link with the shared secret.
//!
//! ```text
//! dialer                                   acceptor
//!   MAGIC, Hello{id, name, addr, boot, Nd} ->
//!                                         <- Challenge{id, name, addr, boot, Na}
//!   Proof{mac_d, view}                     ->   acceptor checks mac_d
//!                                         <- Welcome{mac_a, view}   (or Reject)
//!   dialer checks mac_a (or sends Reject)
//! mac_x = HMAC-SHA256(secret, "warren-cluster/1 " role | Nd | Na | id_d | id_a | boot_d | boot_a)
//! ```
//! HMAC comes from `ring` (already in the lock file through rustls); `ring::hmac::verify`
//! compares in constant time. The secret never crosses the wire, both nonces are fresh 32-byte
//! random values so a recorded exchange cannot be replayed, and the two roles use different labels
//! so one side's proof cannot be reflected back as the other's. The dialer proves first: an
//! unauthenticated dialer never obtains a MAC from the acceptor.
//!
//! The side that finds a bad MAC logs "peer presented a wrong cluster secret" and sends
//! `Reject{WrongSecret}`; the side that receives it logs "cluster secret rejected by peer".
//!
//! Without TLS the handshake authenticates the peer but does not protect what follows (as
//! Erlang distribution without TLS): use [`crate::ClusterTls`] on untrusted networks.
//!
//! Each side also says what it knows of the other ([`PeerView`]): that is how a node that was
//! evicted while it was away learns it on its first contact.

use bytes::{Bytes, BytesMut};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::frame::{Frame, FrameError, MAGIC, MAX_HANDSHAKE_FRAME};
use crate::state::EvictReason;
use crate::types::NodeId;

const PROTO: u16 = 1;
const LABEL: &[u8] = b"warren-cluster/1 ";

/// What one node knows of another, told during the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerView {
    /// A member (voter or learner) in the teller's applied state.
    Member,
    /// Not a member and never evicted (a node joining, or a stranger).
    Unknown,
    /// Evicted, and why.
    Evicted(EvictReason),
}

/// Why a handshake is refused (sent in a `Reject` frame).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RejectReason {
    WrongSecret,
    SelfConnection,
    /// The acceptor keeps its existing link with this peer.
    Duplicate,
    /// The test-only partition hook drops this peer.
    Blocked,
    Protocol(String),
}

/// This node, as it introduces itself.
pub(crate) struct Identity {
    pub(crate) id: NodeId,
    pub(crate) name: String,
    pub(crate) advertise: String,
    pub(crate) boot: u64,
    pub(crate) key: hmac::Key,
}

#[derive(Serialize, Deserialize)]
struct Hello {
    proto: u16,
    id: NodeId,
    name: String,
    addr: String,
    boot: u64,
    nonce: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Proof {
    mac: Vec<u8>,
    view: PeerView,
}

#[derive(Serialize, Deserialize)]
struct Reject {
    reason: RejectReason,
}

/// The authenticated peer.
#[derive(Clone, Debug)]
pub(crate) struct PeerHello {
    pub(crate) id: NodeId,
    pub(crate) name: String,
    pub(crate) addr: String,
    pub(crate) boot: u64,
    /// What the peer knows of us.
    pub(crate) view: PeerView,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("peer presented a wrong cluster secret")]
    WrongSecret,
    #[error("cluster secret rejected by peer")]
    SecretRejected,
    #[error("connected to ourselves")]
    SelfConnection,
    #[error("peer refused: {0:?}")]
    Refused(RejectReason),
    /// The acceptor keeps the link it already has with us: the peer is reachable.
    #[error("a link with node {0:016x} already exists")]
    Duplicate(NodeId),
}

impl From<FrameError> for HandshakeError {
    fn from(e: FrameError) -> Self {
        HandshakeError::Protocol(e.to_string())
    }
}

fn nonce() -> Result<Vec<u8>, HandshakeError> {
    let mut n = vec![0u8; 32];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| HandshakeError::Protocol("no randomness".into()))?;
    Ok(n)
}

fn mac_input(role: &[u8], d: &Hello, a: &Hello) -> Vec<u8> {
    let mut m = Vec::with_capacity(LABEL.len() + role.len() + 96);
    m.extend_from_slice(LABEL);
    m.extend_from_slice(role);
    m.extend_from_slice(&d.nonce);
    m.extend_from_slice(&a.nonce);
    m.extend_from_slice(&d.id.to_be_bytes());
    m.extend_from_slice(&a.id.to_be_bytes());
    m.extend_from_slice(&d.boot.to_be_bytes());
    m.extend_from_slice(&a.boot.to_be_bytes());
    m
}

fn sign(key: &hmac::Key, role: &[u8], d: &Hello, a: &Hello) -> Vec<u8> {
    hmac::sign(key, &mac_input(role, d, a)).as_ref().to_vec()
}

fn verify(key: &hmac::Key, role: &[u8], d: &Hello, a: &Hello, tag: &[u8]) -> bool {
    hmac::verify(key, &mac_input(role, d, a), tag).is_ok()
}

fn json<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn parse<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T, HandshakeError> {
    serde_json::from_slice(b).map_err(|e| HandshakeError::Protocol(format!("bad {what}: {e}")))
}

async fn read_frame<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<Frame, HandshakeError> {
    loop {
        if let Some(f) = Frame::decode(buf, MAX_HANDSHAKE_FRAME)? {
            return Ok(f);
        }
        if io.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Protocol(
                "peer closed during handshake".into(),
            ));
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(io: &mut S, f: Frame) -> Result<(), HandshakeError> {
    io.write_all(&f.to_bytes()).await?;
    io.flush().await?;
    Ok(())
}

async fn reject<S: AsyncWrite + Unpin>(io: &mut S, reason: RejectReason) {
    let _ = send(io, Frame::Reject(json(&Reject { reason }))).await;
}

fn rejected(body: &[u8]) -> HandshakeError {
    match parse::<Reject>(body, "reject") {
        Ok(Reject {
            reason: RejectReason::WrongSecret,
        }) => HandshakeError::SecretRejected,
        Ok(Reject { reason }) => HandshakeError::Refused(reason),
        Err(e) => e,
    }
}

/// Parse a `Reject` frame received after the handshake (the dialer found our MAC wrong).
pub(crate) fn late_reject(body: &[u8]) -> HandshakeError {
    rejected(body)
}

fn hello_of(me: &Identity) -> Result<Hello, HandshakeError> {
    Ok(Hello {
        proto: PROTO,
        id: me.id,
        name: me.name.clone(),
        addr: me.advertise.clone(),
        boot: me.boot,
        nonce: nonce()?,
    })
}

fn peer_of(h: &Hello, view: PeerView) -> PeerHello {
    PeerHello {
        id: h.id,
        name: h.name.clone(),
        addr: h.addr.clone(),
        boot: h.boot,
        view,
    }
}

/// Run the dialer's side. Returns the peer and the bytes already read past the handshake.
pub(crate) async fn dial<S, F>(
    io: &mut S,
    me: &Identity,
    view_of: F,
) -> Result<(PeerHello, BytesMut), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(NodeId) -> PeerView,
{
    let mine = hello_of(me)?;
    let mut out = BytesMut::from(&MAGIC[..]);
    Frame::Hello(json(&mine)).encode(&mut out);
    io.write_all(&out).await?;
    io.flush().await?;
    let mut buf = BytesMut::with_capacity(1024);
    let theirs: Hello = match read_frame(io, &mut buf).await? {
        Frame::Challenge(b) => parse(&b, "challenge")?,
        Frame::Reject(b) => return Err(rejected(&b)),
        f => {
            return Err(HandshakeError::Protocol(format!(
                "expected challenge, got {f:?}"
            )))
        }
    };
    if theirs.id == me.id {
        reject(io, RejectReason::SelfConnection).await;
        return Err(HandshakeError::SelfConnection);
    }
    let proof = Proof {
        mac: sign(&me.key, b"dialer", &mine, &theirs),
        view: view_of(theirs.id),
    };
    send(io, Frame::Proof(json(&proof))).await?;
    let welcome: Proof = match read_frame(io, &mut buf).await? {
        Frame::Welcome(b) => parse(&b, "welcome")?,
        Frame::Reject(b) => {
            return Err(match rejected(&b) {
                HandshakeError::Refused(RejectReason::Duplicate) => {
                    HandshakeError::Duplicate(theirs.id)
                }
                e => e,
            })
        }
        f => {
            return Err(HandshakeError::Protocol(format!(
                "expected welcome, got {f:?}"
            )))
        }
    };
    if !verify(&me.key, b"acceptor", &mine, &theirs, &welcome.mac) {
        reject(io, RejectReason::WrongSecret).await;
        return Err(HandshakeError::WrongSecret);
    }
    Ok((peer_of(&theirs, welcome.view), buf))
}

/// Run the acceptor's side. `admit` may refuse an authenticated peer (duplicate link, test
/// partition). Returns the peer and the bytes already read past the handshake.
pub(crate) async fn accept<S, F, A>(
    io: &mut S,
    me: &Identity,
    view_of: F,
    admit: A,
) -> Result<(PeerHello, BytesMut), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(NodeId) -> PeerView,
    A: FnOnce(&PeerHello) -> Result<(), RejectReason>,
{
    let mut magic = [0u8; 8];
    io.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(HandshakeError::Protocol(
            "not a warren cluster peer (bad magic)".into(),
        ));
    }
    let mut buf = BytesMut::with_capacity(1024);
    let theirs: Hello = match read_frame(io, &mut buf).await? {
        Frame::Hello(b) => parse(&b, "hello")?,
        f => {
            return Err(HandshakeError::Protocol(format!(
                "expected hello, got {f:?}"
            )))
        }
    };
    if theirs.proto != PROTO {
        let why = format!("unsupported protocol version {}", theirs.proto);
        reject(io, RejectReason::Protocol(why.clone())).await;
        return Err(HandshakeError::Protocol(why));
    }
    if theirs.nonce.len() != 32 {
        reject(io, RejectReason::Protocol("bad nonce".into())).await;
        return Err(HandshakeError::Protocol("bad nonce".into()));
    }
    if theirs.id == me.id {
        reject(io, RejectReason::SelfConnection).await;
        return Err(HandshakeError::SelfConnection);
    }
    let mine = hello_of(me)?;
    send(io, Frame::Challenge(json(&mine))).await?;
    let proof: Proof = match read_frame(io, &mut buf).await? {
        Frame::Proof(b) => parse(&b, "proof")?,
        Frame::Reject(b) => return Err(rejected(&b)),
        f => {
            return Err(HandshakeError::Protocol(format!(
                "expected proof, got {f:?}"
            )))
        }
    };
    if !verify(&me.key, b"dialer", &theirs, &mine, &proof.mac) {
        reject(io, RejectReason::WrongSecret).await;
        return Err(HandshakeError::WrongSecret);
    }
    let peer = peer_of(&theirs, proof.view);
    if let Err(reason) = admit(&peer) {
        reject(io, reason.clone()).await;
        return Err(HandshakeError::Refused(reason));
    }
    let welcome = Proof {
        mac: sign(&me.key, b"acceptor", &theirs, &mine),
        view: view_of(theirs.id),
    };
    send(io, Frame::Welcome(json(&welcome))).await?;
    Ok((peer, buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(id: NodeId, secret: &[u8]) -> Identity {
        Identity {
            id,
            name: format!("n{id}"),
            advertise: format!("127.0.0.1:{id}"),
            boot: 100 + id,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    async fn pair(
        d: Identity,
        a: Identity,
    ) -> (
        Result<(PeerHello, BytesMut), HandshakeError>,
        Result<(PeerHello, BytesMut), HandshakeError>,
    ) {
        let (mut x, mut y) = tokio::io::duplex(8192);
        let dial_side = async move { dial(&mut x, &d, |_| PeerView::Member).await };
        let accept_side = async move {
            accept(
                &mut y,
                &a,
                |_| PeerView::Evicted(EvictReason::ForcedOut),
                |_| Ok(()),
            )
            .await
        };
        tokio::join!(dial_side, accept_side)
    }

    #[tokio::test]
    async fn same_secret_authenticates_both_ways() {
        let (d, a) = pair(ident(1, b"cookie"), ident(2, b"cookie")).await;
        let (d, _) = d.unwrap();
        let (a, _) = a.unwrap();
        assert_eq!(d.id, 2);
        assert_eq!(d.view, PeerView::Evicted(EvictReason::ForcedOut));
        assert_eq!(a.id, 1);
        assert_eq!(a.addr, "127.0.0.1:1");
        assert_eq!(a.view, PeerView::Member);
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_with_both_messages() {
        let (d, a) = pair(ident(1, b"wrong"), ident(2, b"cookie")).await;
        let d = d.unwrap_err();
        let a = a.unwrap_err();
        assert_eq!(a.to_string(), "peer presented a wrong cluster secret");
        assert_eq!(d.to_string(), "cluster secret rejected by peer");
    }

    #[tokio::test]
    async fn self_connection_is_detected() {
        let (d, a) = pair(ident(1, b"c"), ident(1, b"c")).await;
        assert!(matches!(a.unwrap_err(), HandshakeError::SelfConnection));
        assert!(d.is_err());
    }

    #[tokio::test]
    async fn junk_is_a_protocol_error() {
        let (mut x, mut y) = tokio::io::duplex(8192);
        x.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let me = ident(2, b"c");
        let r = accept(&mut y, &me, |_| PeerView::Unknown, |_| Ok(())).await;
        assert!(matches!(r, Err(HandshakeError::Protocol(_))));
        // The right magic then a length far over the handshake limit.
        let (mut x, mut y) = tokio::io::duplex(8192);
        x.write_all(MAGIC).await.unwrap();
        x.write_all(&[0x7f, 0xff, 0xff, 0xff, 1]).await.unwrap();
        let r = accept(&mut y, &me, |_| PeerView::Unknown, |_| Ok(())).await;
        assert!(matches!(r, Err(HandshakeError::Protocol(_))));
    }
}
