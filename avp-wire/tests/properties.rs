//! Property tests: round trips for every payload kind × dtype × layout, and no panic
//! (and no undetected corruption) on arbitrary or mutated bytes.

use avp_wire::{
    DType, Envelope, HiddenStateDesc, KvCacheDesc, KvLayout, LayerRange, Message, MessageLayout,
    Payload, TextDesc, TextFormat, v1,
};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn payload() -> impl Strategy<Value = Payload> {
    let kv = (
        1u32..5,
        1u32..4,
        1u32..9,
        0u64..7,
        dtype(),
        any::<bool>(),
        any::<(u8, u8)>(),
    )
        .prop_map(|(layers, heads, hd, seq, dtype, nhd, (a, b))| {
            let start = a as u32 % layers;
            let end = start + 1 + (b as u32 % (layers - start));
            let layout = if nhd { KvLayout::Nhd } else { KvLayout::Hnd };
            Payload::KvCache(
                KvCacheDesc::new(layers, heads, hd, seq, dtype, layout)
                    .with_layers(LayerRange::new(start, end)),
            )
        });
    let hidden =
        (0u64..4, 1u64..20, dtype(), "[a-z0-9:_]{0,12}").prop_map(|(rows, dim, dtype, map_id)| {
            Payload::HiddenState(HiddenStateDesc {
                rows,
                dim,
                dtype,
                map_id,
            })
        });
    let text = (any::<bool>(), 0u64..300).prop_map(|(json, len)| {
        Payload::Text(TextDesc {
            format: if json {
                TextFormat::Json
            } else {
                TextFormat::Plain
            },
            len,
        })
    });
    prop_oneof![kv, hidden, text]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        "[ -~]{0,20}",
        "[0-9a-f]{0,64}",
        "\\PC{0,8}",
        prop::collection::btree_map("[a-z]{1,6}", "\\PC{0,10}", 0..4),
    )
        .prop_map(|(model_id, model_hash, session_id, extra)| Envelope {
            model_id,
            model_hash,
            session_id,
            model_family: "llama".into(),
            extra,
            ..Default::default()
        })
}

/// A valid message and its section contents.
fn message() -> impl Strategy<Value = (Vec<u8>, Vec<Vec<u8>>, Payload, Envelope)> {
    (
        payload(),
        envelope(),
        prop::sample::select(vec![8u32, 64, 4096]),
        any::<u64>(),
    )
        .prop_map(|(payload, env, align, seed)| {
            let layout = MessageLayout::with_alignment(&env, &payload, align).unwrap();
            let sections: Vec<Vec<u8>> = layout
                .sections()
                .enumerate()
                .map(|(i, s)| {
                    (0..s.len)
                        .map(|j| (seed as u8) ^ (i as u8).wrapping_mul(17) ^ (j as u8))
                        .collect()
                })
                .collect();
            let refs: Vec<&[u8]> = sections.iter().map(|v| &v[..]).collect();
            let bytes = layout.encode_to_vec(&refs).unwrap();
            (bytes, sections, payload, env)
        })
}

/// Exercise every accessor; must never panic, whatever the bytes.
fn poke(bytes: &[u8]) {
    let _ = avp_wire::sniff_version(bytes);
    let _ = avp_wire::Preamble::read(bytes);
    if let Ok(m) = v1::decode(bytes) {
        let _ = m
            .kv()
            .map(|kv| (kv.k(0).map(<[u8]>::len), kv.tensors().len()));
        let _ = v1::to_v2(&m);
    }
    if let Ok((m, _)) = Message::parse_prefix(bytes) {
        let _ = m.verify();
        let _ = m.payload();
        let _ = m.envelope().to_owned();
        for i in 0..m.section_count() + 1 {
            let _ = m.verify_section(i);
        }
        if let Ok(kv) = m.kv() {
            for l in 0..kv.desc().num_layers + 1 {
                let _ = (
                    kv.k(l),
                    kv.v(l),
                    kv.k_scales(l),
                    kv.k_as::<f32>(l),
                    kv.verify_layer(l),
                );
            }
        }
        if let Ok(h) = m.hidden() {
            let _ = (h.data(), h.scales(), h.data_as::<half::bf16>());
        }
        if let Ok(t) = m.text() {
            let _ = t.as_str();
        }
        let _ = v1::from_v2(&m, v1::Compression::None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn round_trip((bytes, sections, payload, env) in message()) {
        let m = Message::parse(&bytes).unwrap();
        prop_assert_eq!(m.payload(), payload.clone());
        prop_assert_eq!(m.envelope().to_owned(), env);
        prop_assert_eq!(m.section_count(), sections.len());
        for (s, want) in m.sections().zip(&sections) {
            prop_assert_eq!(s.bytes, &want[..]);
            prop_assert_eq!(s.offset % m.alignment() as u64, 0);
        }
        m.verify().unwrap();
        if let Payload::KvCache(d) = payload {
            let kv = m.kv().unwrap();
            for (i, l) in (d.layers.start..d.layers.end).enumerate() {
                prop_assert_eq!(kv.k(l).unwrap(), &sections[2 * i][..]);
                prop_assert_eq!(kv.v(l).unwrap(), &sections[2 * i + 1][..]);
                kv.verify_layer(l).unwrap();
            }
            prop_assert!(kv.k(d.layers.end).is_err());
        }
    }

    #[test]
    fn any_single_byte_corruption_is_detected((bytes, ..) in message(), pos in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let mut bad = bytes.clone();
        let i = pos.index(bad.len());
        bad[i] ^= xor;
        let detected = match Message::parse(&bad) {
            Err(_) => true,
            Ok(m) => m.verify().is_err(),
        };
        prop_assert!(detected, "flipping byte {} of {} went unnoticed", i, bad.len());
        poke(&bad);
    }

    #[test]
    fn every_truncation_is_refused((bytes, ..) in message(), cut in any::<prop::sample::Index>()) {
        let n = cut.index(bytes.len());
        prop_assert!(Message::parse(&bytes[..n]).is_err());
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        poke(&bytes);
    }

    #[test]
    fn plausible_prefixes_never_panic(version in 1u8..=2, rest in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = vec![0x41, 0x56, version];
        bytes.extend(rest);
        poke(&bytes);
    }

    #[test]
    fn v1_round_trip(payload in prop::collection::vec(any::<u8>(), 0..2000), level in prop::sample::select(vec![0, 1, 3, 19]),
                     map_id in "[a-z0-9:]{0,10}", kv in any::<bool>(), dtype in 0i32..4, shape in prop::collection::vec(any::<u32>(), 0..4)) {
        let meta = v1::Metadata {
            model_id: "m".into(),
            hidden_dim: 7,
            avp_map_id: map_id,
            payload_type: kv as i32,
            dtype,
            tensor_shape: shape,
            extra: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        let c = v1::Compression::from_level(level).unwrap();
        let bytes = v1::encode(&payload, &meta, c).unwrap();
        let d = v1::decode(&bytes).unwrap();
        prop_assert_eq!(&d.payload[..], &payload[..]);
        let mut want = meta.clone();
        want.payload_checksum = Some(crc32fast::hash(&payload));
        want.compression = (level != 0).then(|| "zstd".into());
        prop_assert_eq!(d.metadata, want);
    }

    #[test]
    fn v1_mutations_never_panic(payload in prop::collection::vec(any::<u8>(), 0..300), pos in any::<prop::sample::Index>(), xor in 1u8..=255, level in prop::sample::select(vec![0, 1])) {
        let meta = v1::Metadata { model_id: "m".into(), ..Default::default() };
        let mut bytes = v1::encode(&payload, &meta, v1::Compression::from_level(level).unwrap()).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] ^= xor;
        poke(&bytes);
    }
}
