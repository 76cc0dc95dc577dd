//! The read path's decoder against the full codec: the same frames, lengths and errors for
//! publishes and content headers, whatever their properties, and for damaged ones.

use super::*;
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use proptest::prelude::{any, prop_assert, prop_assert_eq, prop_compose, proptest, Strategy};
use proptest::sample::Index;

fn frame_bytes(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(constants::FRAME_END);
    out
}

/// Both decoders on `buf`: equal results (the read path's frame decoded in full).
fn agree(buf: &[u8]) -> Result<Option<(AMQPFrame, usize)>, CodecError> {
    let full = codec::decode(buf, 131072);
    let fast = decode(buf, 131072).map(|r| r.map(|(f, n)| (f.into_frame(), n)));
    // Compared as printed: a damaged table may hold a NaN, not equal to itself.
    assert_eq!(format!("{fast:?}"), format!("{full:?}"), "frame {buf:?}");
    full
}

fn every_property() -> AMQPProperties {
    let mut headers = FieldTable::default();
    headers.insert("x-n".into(), AMQPValue::LongLongInt(-7));
    headers.insert(
        "x-s".into(),
        AMQPValue::LongString(LongString::from("é text")),
    );
    AMQPProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(9)
        .with_correlation_id("c-1".into())
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_expiration("60000".into())
        .with_message_id("m-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("task".into())
        .with_user_id("guest".into())
        .with_app_id("app".into())
        .with_cluster_id("c".into())
}

fn header_frame(channel: u16, body_size: u64, p: &AMQPProperties) -> Vec<u8> {
    let payload = codec::encode_content_header_payload(body_size, p).expect("encode");
    frame_bytes(constants::FRAME_HEADER, channel, &payload)
}

#[test]
fn a_content_header_stays_as_it_came() {
    for (p, expiration) in [
        (AMQPProperties::default(), None),
        (every_property(), Some(&b"60000"[..])),
    ] {
        let buf = header_frame(3, 1234, &p);
        let (got, n) = decode(&buf, 0).expect("decode").expect("complete");
        assert_eq!(n, buf.len());
        assert_eq!(got, Inbound::Header(3, buf[7..buf.len() - 1].to_vec()));
        agree(&buf).expect("the codec decodes it");
        let Inbound::Header(_, payload) = got else {
            unreachable!()
        };
        assert_eq!(body_size(&payload), 1234);
        assert_eq!(class_id(&payload), 60);
        assert_eq!(
            codec::header_property(&payload, prop::EXPIRATION),
            expiration
        );
    }
}

#[test]
fn a_publish_is_read_in_place() {
    for (exchange, key, bits) in [("", "q", 0u8), ("amq.topic", "a.b.c", 1), ("x", "", 3)] {
        let mut args = vec![0, 60, 0, 40, 0, 0];
        args.push(exchange.len() as u8);
        args.extend_from_slice(exchange.as_bytes());
        args.push(key.len() as u8);
        args.extend_from_slice(key.as_bytes());
        args.push(bits);
        let buf = frame_bytes(constants::FRAME_METHOD, 1, &args);
        let Ok(Some((AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(p))), _))) =
            agree(&buf)
        else {
            panic!("not a publish: {buf:?}");
        };
        assert_eq!(p.exchange.as_str(), exchange);
        assert_eq!(p.routing_key.as_str(), key);
        assert_eq!((p.mandatory, p.immediate), (bits & 1 != 0, bits & 2 != 0));
        // A byte too many, a byte too few, a name that is not UTF-8: refused as the codec does.
        let mut longer = args.clone();
        longer.push(0);
        let e = agree(&frame_bytes(constants::FRAME_METHOD, 1, &longer));
        assert_eq!(e, Err(CodecError::Malformed("method")));
        let e = agree(&frame_bytes(
            constants::FRAME_METHOD,
            1,
            &args[..args.len() - 1],
        ));
        assert_eq!(e, Err(CodecError::Malformed("method")));
    }
    let bad_utf8 = [0, 60, 0, 40, 0, 0, 1, 0xff, 0, 0];
    let e = agree(&frame_bytes(constants::FRAME_METHOD, 1, &bad_utf8));
    assert_eq!(e, Err(CodecError::Malformed("method")));
}

#[test]
fn damaged_headers_are_refused_as_the_codec_refuses_them() {
    let good = codec::encode_content_header_payload(5, &every_property()).expect("encode");
    // Cut anywhere inside the properties (the frame's size says where it ends).
    for cut in 0..good.len() {
        let r = agree(&frame_bytes(constants::FRAME_HEADER, 1, &good[..cut]));
        assert_eq!(
            r,
            Err(CodecError::Malformed("content header")),
            "cut at {cut}"
        );
    }
    // A short string that is not UTF-8 (the content type's first byte).
    let mut bad = good.clone();
    bad[15] = 0xff;
    let r = agree(&frame_bytes(constants::FRAME_HEADER, 1, &bad));
    assert_eq!(r, Err(CodecError::Malformed("content header")));
    // A byte after the last property.
    let mut longer = good.clone();
    longer.push(0);
    let r = agree(&frame_bytes(constants::FRAME_HEADER, 1, &longer));
    assert_eq!(r, Err(CodecError::Malformed("content header")));
}

#[test]
fn weight_and_unnamed_flag_bits_are_zeroed() {
    let mut payload =
        codec::encode_content_header_payload(0, &AMQPProperties::default().with_priority(4))
            .expect("encode");
    payload[2..4].copy_from_slice(&7u16.to_be_bytes());
    payload[13] |= 0b11;
    let buf = frame_bytes(constants::FRAME_HEADER, 2, &payload);
    agree(&buf).expect("the codec decodes it");
    let Ok(Some((Inbound::Header(2, kept), _))) = decode(&buf, 0) else {
        panic!("refused");
    };
    assert_eq!(&kept[2..4], &[0, 0]);
    assert_eq!(kept[13] & 0b11, 0);
    assert_eq!(
        codec::header_property(&kept, prop::PRIORITY),
        Some(&[4u8][..])
    );
}

#[test]
fn tables_nested_too_deep_are_reported_as_the_codec_does() {
    let mut v = AMQPValue::Boolean(true);
    for _ in 0..200 {
        let mut t = FieldTable::default();
        t.insert("k".into(), v);
        v = AMQPValue::FieldTable(t);
    }
    let mut headers = FieldTable::default();
    headers.insert("deep".into(), v);
    let buf = header_frame(4, 0, &AMQPProperties::default().with_headers(headers));
    let r = agree(&buf);
    assert!(
        matches!(r, Err(CodecError::TooDeep { channel: 4, class_id: 60, method_id: 40, len }) if len == buf.len()),
        "{r:?}"
    );
}

#[test]
fn a_decoded_header_fed_to_the_state_machine_keeps_its_class() {
    let h = AMQPContentHeader {
        class_id: 50,
        body_size: 3,
        properties: AMQPProperties::default().with_app_id("a".into()),
    };
    let payload = header_payload(&h).expect("encode");
    assert_eq!(class_id(&payload), 50);
    assert_eq!(body_size(&payload), 3);
    assert_eq!(
        Inbound::Header(1, payload).into_frame(),
        AMQPFrame::Header(1, h)
    );
}

fn short() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[a-zé.-]{0,12}")
}

prop_compose! {
    fn properties()(
        ct in short(), ce in short(), cid in short(), rt in short(), exp in short(),
        mid in short(), kind in short(), uid in short(), app in short(), cluster in short(),
        mode in proptest::option::of(any::<u8>()), prio in proptest::option::of(any::<u8>()),
        ts in proptest::option::of(any::<u64>()),
        headers in proptest::option::of(proptest::collection::vec(("[a-z]{1,6}", any::<i32>()), 0..4)),
    ) -> AMQPProperties {
        let mut p = AMQPProperties::default();
        if let Some(v) = ct { p = p.with_content_type(v.into()); }
        if let Some(v) = ce { p = p.with_content_encoding(v.into()); }
        if let Some(h) = headers {
            let mut t = FieldTable::default();
            for (k, v) in h { t.insert(k.into(), AMQPValue::LongInt(v)); }
            p = p.with_headers(t);
        }
        if let Some(v) = mode { p = p.with_delivery_mode(v); }
        if let Some(v) = prio { p = p.with_priority(v); }
        if let Some(v) = cid { p = p.with_correlation_id(v.into()); }
        if let Some(v) = rt { p = p.with_reply_to(v.into()); }
        if let Some(v) = exp { p = p.with_expiration(v.into()); }
        if let Some(v) = mid { p = p.with_message_id(v.into()); }
        if let Some(v) = ts { p = p.with_timestamp(v); }
        if let Some(v) = kind { p = p.with_type(v.into()); }
        if let Some(v) = uid { p = p.with_user_id(v.into()); }
        if let Some(v) = app { p = p.with_app_id(v.into()); }
        if let Some(v) = cluster { p = p.with_cluster_id(v.into()); }
        p
    }
}

proptest! {
    #[test]
    fn any_properties_and_any_damage_decode_alike(
        p in properties(),
        size in any::<u64>(),
        flips in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..3),
        cut in proptest::option::of(any::<Index>()),
    ) {
        let mut payload = codec::encode_content_header_payload(size, &p).expect("encode");
        let clean = agree(&frame_bytes(constants::FRAME_HEADER, 1, &payload));
        prop_assert!(clean.is_ok());
        for (at, byte) in flips {
            let i = at.index(payload.len());
            payload[i] = byte;
        }
        if let Some(c) = cut {
            payload.truncate(c.index(payload.len() + 1));
        }
        let buf = frame_bytes(constants::FRAME_HEADER, 1, &payload);
        let _ = agree(&buf);
        for end in 0..buf.len() {
            prop_assert_eq!(decode(&buf[..end], 0), Ok(None));
        }
    }
}
