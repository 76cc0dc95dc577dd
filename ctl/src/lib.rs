//! `warren-ctl`: the rabbitmqctl equivalent, a client of a node's management
//! HTTP API (RabbitMQ 3.10's paths and JSON shapes).
//!
//! A crate of its own, apart from `warren-broker`: it only speaks HTTP to a node,
//! so it links none of the broker's code.
//!
//! # Layout
//! - [`args`]: command-line parsing into an [`args::Invocation`] (pure).
//! - [`format`](mod@format): rabbitmqctl's tab-separated tables and `--formatter json` (pure).
//! - [`exec`]: runs one command against anything that implements [`Api`];
//!   unit tests drive it with a scripted fake, the binary with [`http::HttpApi`].
//! - [`http`]: the only I/O: a small HTTP/1.1 client (hyper) with basic auth.
//!
//! Exit codes follow rabbitmqctl (BSD sysexits), see [`exit`].

pub mod args;
pub mod exec;
pub mod format;
pub mod http;

use std::fmt;

/// Port of the management API when `-n` names a node rather than a URL.
pub const DEFAULT_PORT: u16 = 15672;

/// Exit codes (sysexits.h), as rabbitmqctl uses them.
pub mod exit {
    pub const OK: i32 = 0;
    /// Bad command line.
    pub const USAGE: i32 = 64;
    /// Bad input data (a policy definition that is not JSON, a bad definitions file).
    pub const DATA_ERR: i32 = 65;
    /// An input file cannot be read.
    pub const NO_INPUT: i32 = 66;
    /// The user named in the command does not exist.
    pub const NO_USER: i32 = 67;
    /// The node cannot be reached.
    pub const UNAVAILABLE: i32 = 69;
    /// Any other failure (the node refused the operation).
    pub const SOFTWARE: i32 = 70;
    /// An output file cannot be written.
    pub const CANT_CREATE: i32 = 73;
    /// Timed out (await_startup).
    pub const TEMP_FAIL: i32 = 75;
    /// Authentication failed or the user lacks the needed tag.
    pub const NO_PERM: i32 = 77;
}

/// A failure with the exit code it maps to; `message` is for humans (stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlError {
    pub code: i32,
    pub message: String,
    /// Usage errors are followed by the usage text.
    pub show_usage: bool,
}

impl CtlError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CtlError {
            code,
            message: message.into(),
            show_usage: false,
        }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        CtlError {
            show_usage: true,
            ..CtlError::new(exit::USAGE, message)
        }
    }
    pub fn data(message: impl Into<String>) -> Self {
        CtlError::new(exit::DATA_ERR, message)
    }
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CtlError {}

/// HTTP methods the management API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Post,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

/// An HTTP answer: status and raw body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why no HTTP answer came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// Connecting failed (refused, no route, name not resolved).
    Unreachable(String),
    /// No complete answer within the timeout.
    Timeout,
    /// The peer spoke something that is not HTTP, or hung up mid-answer.
    Protocol(String),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::Unreachable(e) => write!(f, "cannot connect: {e}"),
            TransportError::Timeout => f.write_str("no answer before the timeout"),
            TransportError::Protocol(e) => write!(f, "bad HTTP answer: {e}"),
        }
    }
}

/// The management API as [`exec`] sees it. `path` starts with `/api/`.
pub trait Api {
    fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, TransportError>;
}

/// Percent-encodes one path segment (a vhost `/` becomes `%2F`, as the API expects).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Standard base64 with padding (for the basic-auth header).
pub fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The `Authorization` header value for HTTP basic auth.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc, "{plain}");
        }
        assert_eq!(basic_auth("guest", "guest"), "Basic Z3Vlc3Q6Z3Vlc3Q=");
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("/"), "%2F");
        assert_eq!(encode_segment("a b/c?d#é"), "a%20b%2Fc%3Fd%23%C3%A9");
        assert_eq!(encode_segment("ha-all_1.x~"), "ha-all_1.x~");
    }
}
