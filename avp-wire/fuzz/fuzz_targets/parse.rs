//! Feed arbitrary bytes to every decoder and accessor: none may panic, and any
//! v2 message that parses must verify or report a typed error.
#![no_main]

use avp_wire::{Message, v1};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = avp_wire::sniff_version(data);
    if let Ok(m) = v1::decode_with_limits(data, &v1::Limits { max_decompressed: 1 << 24 }) {
        if let Ok(kv) = m.kv() {
            let _ = (kv.k(0), kv.v(kv.header.num_layers.saturating_sub(1)), kv.tensors().len());
        }
        let _ = v1::to_v2(&m);
    }
    if let Ok((m, _rest)) = Message::parse_prefix(data) {
        let _ = m.verify();
        let _ = m.payload();
        let _ = m.envelope().to_owned();
        for i in 0..=m.section_count() {
            let _ = m.verify_section(i);
        }
        if let Ok(kv) = m.kv() {
            let r = kv.desc().layers;
            for l in r.start.saturating_sub(1)..=r.end {
                let _ = (kv.k(l), kv.v(l), kv.k_scales(l), kv.v_as::<f32>(l), kv.verify_layer(l));
            }
        }
        if let Ok(h) = m.hidden() {
            let _ = (h.data(), h.scales(), h.data_as::<f32>());
        }
        if let Ok(t) = m.text() {
            let _ = t.as_str();
        }
        let _ = v1::from_v2(&m, v1::Compression::None);
    }
});
