//! The counts a client reads in queue.declare-ok, on any node of a cluster (real broker
//! processes on loopback): the queue's own, after everything that client sent before, as
//! RabbitMQ's queue process answers them; not a figure refreshed now and then.

mod support;

use support::cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declare_ok_counts_what_was_confirmed_and_consumed_before_it_on_any_node() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-dc");
    let a = start("a@dc", &root.path().join("a"), &secret, None).await;
    let b = start("b@dc", &root.path().join("b"), &secret, Some(&a.cluster())).await;
    voters(&a, 2).await;
    // Mastered on b (declared there); a serves it through its proxy.
    let (_cb, chb) = channel_on(&b).await;
    support::declare(&chb, "counted", Default::default()).await;
    eventually("a has the queue", || async {
        queue_info(&a, "counted").await["node"] == "b@dc"
    })
    .await;
    let (ca, cha) = channel_on(&a).await;
    for ch in [&cha, &chb] {
        ch.confirm_select(Default::default())
            .await
            .expect("confirms");
    }
    let mut n = 0;
    for _ in 0..10 {
        for ch in [&cha, &chb] {
            assert!(publish_confirmed(ch, "", "counted", b"x", false).await);
            n += 1;
            assert_eq!(ready_on(&cha, "counted").await, n, "through a");
            assert_eq!(ready_on(&chb, "counted").await, n, "on b");
        }
    }
    // A consumer that took them all (no ack) through a: none ready, one consumer.
    let chc = ca.create_channel().await.expect("channel");
    let mut consumer = support::consume(&chc, "counted", true).await;
    for _ in 0..n {
        support::next(&mut consumer).await;
    }
    for ch in [&cha, &chb] {
        let counts = passive_counts(ch, "counted").await.expect("passive");
        assert_eq!(counts, (0, 1));
    }
}
