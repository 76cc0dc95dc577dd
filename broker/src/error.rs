//! AMQP errors, split the way the protocol splits them.
//!
//! A [`ChannelError`] (soft, 3xx/4xx) closes one channel with `channel.close`; a
//! [`ConnectionError`] (hard, 5xx/320/402) closes the whole connection with `connection.close`.
//! Reply codes are stable API: clients switch on them.

use amq_protocol::protocol::{AMQPHardError, AMQPSoftError};
use std::fmt;

/// Name RabbitMQ puts in front of the reply text ("NOT_FOUND - ...").
fn soft_name(e: &AMQPSoftError) -> &'static str {
    match e {
        AMQPSoftError::CONTENTTOOLARGE => "CONTENT_TOO_LARGE",
        AMQPSoftError::NOROUTE => "NO_ROUTE",
        AMQPSoftError::NOCONSUMERS => "NO_CONSUMERS",
        AMQPSoftError::ACCESSREFUSED => "ACCESS_REFUSED",
        AMQPSoftError::NOTFOUND => "NOT_FOUND",
        AMQPSoftError::RESOURCELOCKED => "RESOURCE_LOCKED",
        AMQPSoftError::PRECONDITIONFAILED => "PRECONDITION_FAILED",
    }
}

fn hard_name(e: &AMQPHardError) -> &'static str {
    match e {
        AMQPHardError::CONNECTIONFORCED => "CONNECTION_FORCED",
        AMQPHardError::INVALIDPATH => "INVALID_PATH",
        AMQPHardError::FRAMEERROR => "FRAME_ERROR",
        AMQPHardError::SYNTAXERROR => "SYNTAX_ERROR",
        AMQPHardError::COMMANDINVALID => "COMMAND_INVALID",
        AMQPHardError::CHANNELERROR => "CHANNEL_ERROR",
        AMQPHardError::UNEXPECTEDFRAME => "UNEXPECTED_FRAME",
        AMQPHardError::RESOURCEERROR => "RESOURCE_ERROR",
        AMQPHardError::NOTALLOWED => "NOT_ALLOWED",
        AMQPHardError::NOTIMPLEMENTED => "NOT_IMPLEMENTED",
        AMQPHardError::INTERNALERROR => "INTERNAL_ERROR",
    }
}

/// A soft error: the channel is closed, the connection lives on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ChannelError {
    pub kind: AMQPSoftError,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} - {}", soft_name(&self.kind), self.text)
    }
}

impl ChannelError {
    pub fn new(kind: AMQPSoftError, text: impl Into<String>) -> Self {
        Self {
            kind,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }
    pub fn not_found(text: impl Into<String>) -> Self {
        Self::new(AMQPSoftError::NOTFOUND, text)
    }
    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(AMQPSoftError::ACCESSREFUSED, text)
    }
    pub fn resource_locked(text: impl Into<String>) -> Self {
        Self::new(AMQPSoftError::RESOURCELOCKED, text)
    }
    pub fn precondition_failed(text: impl Into<String>) -> Self {
        Self::new(AMQPSoftError::PRECONDITIONFAILED, text)
    }
    /// The numeric reply code for `channel.close`.
    pub fn reply_code(&self) -> u16 {
        self.kind.get_id()
    }
    /// The reply text for `channel.close`, RabbitMQ style ("NOT_FOUND - no queue ...").
    pub fn reply_text(&self) -> String {
        let mut s = self.to_string();
        truncate_short(&mut s);
        s
    }
    pub fn with_method(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }
}

/// A hard error: the connection is closed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConnectionError {
    pub kind: AMQPHardError,
    /// Only for 403 ACCESS_REFUSED at login, which RabbitMQ sends as a connection.close even
    /// though 403 is a soft code.
    pub login_refused: bool,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.login_refused {
            write!(f, "ACCESS_REFUSED - {}", self.text)
        } else {
            write!(f, "{} - {}", hard_name(&self.kind), self.text)
        }
    }
}

impl ConnectionError {
    pub fn new(kind: AMQPHardError, text: impl Into<String>) -> Self {
        Self {
            kind,
            login_refused: false,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }
    /// Login refused: connection.close 403 (authentication_failure_close).
    pub fn access_refused(text: impl Into<String>) -> Self {
        Self {
            login_refused: true,
            ..Self::new(AMQPHardError::NOTALLOWED, text)
        }
    }
    pub fn frame_error(text: impl Into<String>) -> Self {
        Self::new(AMQPHardError::FRAMEERROR, text)
    }
    pub fn syntax_error(text: impl Into<String>) -> Self {
        Self::new(AMQPHardError::SYNTAXERROR, text)
    }
    pub fn command_invalid(text: impl Into<String>) -> Self {
        Self::new(AMQPHardError::COMMANDINVALID, text)
    }
    pub fn channel_error(text: impl Into<String>) -> Self {
        Self::new(AMQPHardError::CHANNELERROR, text)
    }
    pub fn unexpected_frame(text: impl Into<String>) -> Self {
        Self::new(AMQPHardError::UNEXPECTEDFRAME, text)
    }
    pub fn not_allowed(text: impl Into<String>) -> Self {
        Self::new(AMQPHardError::NOTALLOWED, text)
    }
    pub fn not_implemented(text: impl Into<String>) -> Self {
        Self::new(AMQPHardError::NOTIMPLEMENTED, text)
    }
    pub fn internal(text: impl Into<String>) -> Self {
        Self::new(AMQPHardError::INTERNALERROR, text)
    }
    pub fn forced(text: impl Into<String>) -> Self {
        Self::new(AMQPHardError::CONNECTIONFORCED, text)
    }
    /// The numeric reply code for `connection.close`.
    pub fn reply_code(&self) -> u16 {
        if self.login_refused {
            403
        } else {
            self.kind.get_id()
        }
    }
    pub fn reply_text(&self) -> String {
        let mut s = self.to_string();
        truncate_short(&mut s);
        s
    }
    pub fn with_method(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }
}

/// Short strings are at most 255 bytes on the wire.
fn truncate_short(s: &mut String) {
    if s.len() > 255 {
        let mut end = 255;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Either kind, as returned by method handlers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AmqpError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl AmqpError {
    pub fn with_method(self, class_id: u16, method_id: u16) -> Self {
        match self {
            AmqpError::Channel(e) => AmqpError::Channel(e.with_method(class_id, method_id)),
            AmqpError::Connection(e) => AmqpError::Connection(e.with_method(class_id, method_id)),
        }
    }
}

/// Frame-level decoding failures; each maps to a hard error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("frame size {size} exceeds negotiated frame_max {max}")]
    TooLarge { size: u64, max: u32 },
    #[error("bad frame end octet {0:#x}")]
    BadFrameEnd(u8),
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("prefetch_size!={0}")]
    PrefetchSize(u32),
    /// A field table in the frame nests deeper than [`crate::nesting::MAX_DEPTH`]. The frame
    /// (`len` bytes) was not parsed; a channel's frame closes that channel, a connection-level
    /// one the connection.
    #[error("field table nested deeper than {} levels", crate::nesting::MAX_DEPTH)]
    TooDeep {
        channel: u16,
        class_id: u16,
        method_id: u16,
        len: usize,
    },
    #[error("cannot encode frame")]
    Encode,
}

impl From<CodecError> for ConnectionError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TooLarge { .. } | CodecError::BadFrameEnd(_) => {
                ConnectionError::frame_error(e.to_string())
            }
            CodecError::UnknownFrameType(_) => ConnectionError::frame_error(e.to_string()),
            CodecError::Malformed(_) => ConnectionError::syntax_error(e.to_string()),
            CodecError::TooDeep {
                class_id,
                method_id,
                ..
            } => ConnectionError::syntax_error(e.to_string()).with_method(class_id, method_id),
            CodecError::PrefetchSize(n) => {
                ConnectionError::not_implemented(format!("prefetch_size!=0 ({n})"))
                    .with_method(60, 10)
            }
            CodecError::Encode => ConnectionError::internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_codes_and_texts() {
        let e = ChannelError::not_found("no queue 'q' in vhost '/'");
        assert_eq!(e.reply_code(), 404);
        assert_eq!(e.reply_text(), "NOT_FOUND - no queue 'q' in vhost '/'");
        let e = ConnectionError::access_refused("Login was refused");
        assert_eq!(e.reply_code(), 403);
        assert!(e.reply_text().starts_with("ACCESS_REFUSED - "));
        assert_eq!(ConnectionError::frame_error("x").reply_code(), 501);
        assert_eq!(ConnectionError::forced("x").reply_code(), 320);
    }
}
