//! RabbitMQ's global counters (`rabbitmq_global_*`, per protocol and queue type) and the
//! message size histogram (`rabbitmq_message_size_bytes`), as its global and message size
//! collectors write them.
//!
//! Warren speaks AMQP 0-9-1 and its queues are classic queues: each metric has one series,
//! `protocol="amqp091"`, with `queue_type="rabbit_classic_queue"` where RabbitMQ splits by
//! queue type.

use super::{Out, Scrape};
use crate::stats::{SizeCounts, SIZE_BUCKETS};

const PROTO: &str = "protocol=\"amqp091\"";
const CLASSIC: &str = "protocol=\"amqp091\",queue_type=\"rabbit_classic_queue\"";

/// The `le` labels of the message size buckets, spelled as RabbitMQ's exporter spells them
/// (Go's float format): dashboards select buckets by these exact strings (`le="1e+06"`).
const SIZE_LE: [&str; SIZE_BUCKETS.len() + 1] = [
    "100.0", "1000.0", "10000.0", "100000.0", "1e+06", "1e+07", "5e+07", "1e+08", "+Inf",
];

pub(super) fn write(o: &mut Out, d: &Scrape) {
    let t = &d.totals;
    let publishers = d
        .channels
        .iter()
        .flat_map(|(_, chans)| chans)
        .filter(|c| c.publishing)
        .count() as u64;
    let consumers = d
        .channels
        .iter()
        .flat_map(|(_, chans)| chans)
        .map(|c| c.consumers.len() as u64)
        .sum::<u64>();
    let metrics: [(&str, &str, &str, &str, u64); 16] = [
        (
            "rabbitmq_global_messages_received_total",
            "counter",
            "Total number of messages received from publishers",
            PROTO,
            t.publish,
        ),
        (
            "rabbitmq_global_messages_received_confirm_total",
            "counter",
            "Total number of messages received from publishers expecting confirmations",
            PROTO,
            t.publish_confirm,
        ),
        (
            "rabbitmq_global_messages_routed_total",
            "counter",
            "Total number of messages routed to queues or streams",
            PROTO,
            t.publish
                .saturating_sub(t.drop_unroutable + t.return_unroutable),
        ),
        (
            "rabbitmq_global_messages_unroutable_dropped_total",
            "counter",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
            PROTO,
            t.drop_unroutable,
        ),
        (
            "rabbitmq_global_messages_unroutable_returned_total",
            "counter",
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
            PROTO,
            t.return_unroutable,
        ),
        (
            "rabbitmq_global_messages_confirmed_total",
            "counter",
            "Total number of messages confirmed to publishers",
            PROTO,
            t.confirm,
        ),
        (
            "rabbitmq_global_publishers",
            "gauge",
            "Current number of publishers",
            PROTO,
            publishers,
        ),
        (
            "rabbitmq_global_consumers",
            "gauge",
            "Current number of consumers",
            PROTO,
            consumers,
        ),
        (
            "rabbitmq_global_messages_delivered_total",
            "counter",
            "Total number of messages delivered to consumers",
            CLASSIC,
            t.deliver_get(),
        ),
        (
            "rabbitmq_global_messages_delivered_consume_manual_ack_total",
            "counter",
            "Total number of messages delivered to consumers using basic.consume with manual acknowledgment",
            CLASSIC,
            t.deliver,
        ),
        (
            "rabbitmq_global_messages_delivered_consume_auto_ack_total",
            "counter",
            "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment",
            CLASSIC,
            t.deliver_no_ack,
        ),
        (
            "rabbitmq_global_messages_delivered_get_manual_ack_total",
            "counter",
            "Total number of messages delivered to consumers using basic.get with manual acknowledgment",
            CLASSIC,
            t.get,
        ),
        (
            "rabbitmq_global_messages_delivered_get_auto_ack_total",
            "counter",
            "Total number of messages delivered to consumers using basic.get with automatic acknowledgment",
            CLASSIC,
            t.get_no_ack,
        ),
        (
            "rabbitmq_global_messages_get_empty_total",
            "counter",
            "Total number of times basic.get operations fetched no message",
            CLASSIC,
            t.get_empty,
        ),
        (
            "rabbitmq_global_messages_redelivered_total",
            "counter",
            "Total number of messages redelivered to consumers",
            CLASSIC,
            t.redeliver,
        ),
        (
            "rabbitmq_global_messages_acknowledged_total",
            "counter",
            "Total number of messages acknowledged by consumers",
            CLASSIC,
            t.ack,
        ),
    ];
    for (name, kind, help, labels, v) in metrics {
        o.one(name, kind, help, labels, v);
    }
    message_sizes(o, &d.sizes);
}

/// The histogram, cumulative as Prometheus wants it.
fn message_sizes(o: &mut Out, sizes: &SizeCounts) {
    let name = "rabbitmq_message_size_bytes";
    o.family(
        name,
        "histogram",
        "Size of messages received from publishers",
    );
    let mut seen = 0;
    for (n, le) in sizes.buckets.iter().zip(SIZE_LE) {
        seen += n;
        o.sample(
            &format!("{name}_bucket"),
            &format!("{PROTO},le=\"{le}\""),
            seen,
        );
    }
    o.sample(&format!("{name}_sum"), PROTO, sizes.sum);
    o.sample(&format!("{name}_count"), PROTO, sizes.count());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_labels_spell_the_bucket_bounds() {
        for (bound, le) in SIZE_BUCKETS.iter().zip(SIZE_LE) {
            assert_eq!(le.parse::<f64>().ok(), Some(*bound as f64), "{le}");
        }
        assert_eq!(SIZE_LE[SIZE_BUCKETS.len()], "+Inf");
    }

    #[test]
    fn buckets_are_cumulative() {
        let mut o = Out(String::new());
        let sizes = SizeCounts {
            buckets: [2, 1, 0, 0, 0, 0, 0, 0, 1],
            sum: 200_000_300,
        };
        message_sizes(&mut o, &sizes);
        assert!(o
            .0
            .contains("rabbitmq_message_size_bytes_bucket{protocol=\"amqp091\",le=\"100.0\"} 2\n"));
        assert!(o
            .0
            .contains("rabbitmq_message_size_bytes_bucket{protocol=\"amqp091\",le=\"1e+08\"} 3\n"));
        assert!(o
            .0
            .contains("rabbitmq_message_size_bytes_bucket{protocol=\"amqp091\",le=\"+Inf\"} 4\n"));
        assert!(o
            .0
            .contains("rabbitmq_message_size_bytes_count{protocol=\"amqp091\"} 4\n"));
        assert!(o
            .0
            .contains("rabbitmq_message_size_bytes_sum{protocol=\"amqp091\"} 200000300\n"));
    }
}
