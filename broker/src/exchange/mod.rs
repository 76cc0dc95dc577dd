//! Exchanges as pure routing tables. No I/O, no queues: an exchange maps a routing key (and
//! headers) to [`Destination`] names; the vhost resolves names to queue handles.

pub mod headers;
pub mod topic;

use amq_protocol::types::FieldTable;
use std::collections::HashMap;
use std::sync::Arc;

/// Exchange type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "direct" => Self::Direct,
            "fanout" => Self::Fanout,
            "topic" => Self::Topic,
            "headers" => Self::Headers,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// Where a binding points.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Queue(Arc<str>),
    Exchange(Arc<str>),
}

/// One binding of an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// An exchange definition with its bindings. Replaced whole on change (copy-on-write).
#[derive(Debug, Clone)]
pub struct Exchange {
    pub name: Arc<str>,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// The `alternate-exchange` argument.
    alternate_arg: Option<String>,
    /// The policy that applies, if any (its `alternate-exchange` is used when the exchange
    /// has no argument of that name, as RabbitMQ does).
    pub policy: Option<std::sync::Arc<crate::policy::Policy>>,
    bindings: Vec<Binding>,
    /// Direct exchanges: routing key -> indexes into `bindings`.
    direct_index: HashMap<String, Vec<usize>>,
    /// Message counters, shared by the copies a change makes.
    pub stats: Arc<crate::stats::ExchangeStats>,
}

impl Exchange {
    pub fn new(
        name: &str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        let alternate_arg = match arguments.inner().get("alternate-exchange") {
            Some(amq_protocol::types::AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            Some(amq_protocol::types::AMQPValue::ShortString(s)) => Some(s.to_string()),
            _ => None,
        };
        Self {
            name: name.into(),
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            alternate_arg,
            policy: None,
            bindings: Vec::new(),
            direct_index: HashMap::new(),
            stats: Arc::default(),
        }
    }

    /// The alternate exchange: the argument's, else the policy's.
    pub fn alternate(&self) -> Option<&str> {
        self.alternate_arg.as_deref().or_else(|| {
            self.policy
                .as_deref()
                .and_then(|p| p.definition.get("alternate-exchange"))
                .and_then(|v| v.as_str())
        })
    }

    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    fn reindex(&mut self) {
        self.direct_index.clear();
        if self.kind == ExchangeKind::Direct {
            for (i, b) in self.bindings.iter().enumerate() {
                self.direct_index
                    .entry(b.routing_key.clone())
                    .or_default()
                    .push(i);
            }
        }
    }

    /// Adds a binding; returns false if an identical one exists.
    pub fn bind(&mut self, b: Binding) -> bool {
        if self.bindings.contains(&b) {
            return false;
        }
        self.bindings.push(b);
        self.reindex();
        true
    }

    /// Removes a binding; returns false if it did not exist.
    pub fn unbind(&mut self, b: &Binding) -> bool {
        let before = self.bindings.len();
        self.bindings.retain(|x| x != b);
        let removed = self.bindings.len() != before;
        if removed {
            self.reindex();
        }
        removed
    }

    /// Removes every binding to `dest`; returns true if any was removed.
    pub fn unbind_destination(&mut self, dest: &Destination) -> bool {
        let before = self.bindings.len();
        self.bindings.retain(|x| &x.destination != dest);
        let removed = self.bindings.len() != before;
        if removed {
            self.reindex();
        }
        removed
    }

    /// Destinations matching a message; appended to `out`.
    pub fn route<'a>(
        &'a self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<&'a Destination>,
    ) {
        match self.kind {
            ExchangeKind::Direct => {
                if let Some(idx) = self.direct_index.get(routing_key) {
                    out.extend(idx.iter().map(|&i| &self.bindings[i].destination));
                }
            }
            ExchangeKind::Fanout => out.extend(self.bindings.iter().map(|b| &b.destination)),
            ExchangeKind::Topic => out.extend(
                self.bindings
                    .iter()
                    .filter(|b| topic::topic_matches(&b.routing_key, routing_key))
                    .map(|b| &b.destination),
            ),
            ExchangeKind::Headers => out.extend(
                self.bindings
                    .iter()
                    .filter(|b| headers::headers_match(&b.arguments, headers))
                    .map(|b| &b.destination),
            ),
        }
    }
}
