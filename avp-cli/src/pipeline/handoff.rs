//! A context through a transport, its KV cache where it lives.
//!
//! - A sender whose transport device (`Options::device`) is its model's GPU
//!   loans device sections: K and V go device to device into a `cuda://` slot,
//!   or, on a session that stayed in host memory, are copied out once straight
//!   into the slot (counted as device to host). A CPU model with a transport
//!   device copies its host bytes in (counted as host to device).
//! - Otherwise (no transport device, or one the model's tensors are not on:
//!   another GPU, or the emulated device; or a KV wire dtype narrower than the
//!   model's f32, converted as it is written) the context is written through
//!   host memory into an ordinary loan.
//! - A receiver holding a device message fills the model's own tensors from
//!   it ([`Context::from_sections`]): device to device when the session's
//!   device is the model's GPU, through host buffers otherwise.
//!
//! The transport's `Stats` count every byte that crossed between host and
//! device, which is how a handoff proves it stayed on the GPU.

use anyhow::{Context as _, bail};
use avp_model::{Context, FillTo, KvTarget, Model};
use avp_transport::{RecvGuard, Sender};
use avp_wire::{DType, MessageLayout, Payload};

/// Whether device memory of `model` (where a model's tensors are) is memory
/// of the transport's `device`: the same GPU.
fn same_gpu(model: Option<avp_model::Device>, transport: Option<avp_transport::Device>) -> bool {
    match (model, transport) {
        (Some(avp_model::Device::Cuda(m)), Some(avp_transport::Device::Cuda(t))) => m == t as usize,
        _ => false,
    }
}

/// Send `ctx` laid out by `layout` (from [`Context::layout`]) through `tx`.
pub fn send(tx: &mut Sender, ctx: &Context, layout: &MessageLayout) -> anyhow::Result<()> {
    // The model's tensors are f32: a narrower wire dtype is converted on the host.
    let f32_kv = matches!(layout.payload(), Payload::KvCache(d) if d.dtype == DType::F32);
    let kv = match &ctx.kv {
        Some(kv)
            if tx.device().is_some()
                && f32_kv
                && !kv.is_empty()
                && (!kv.on_gpu() || same_gpu(kv.device(), tx.device())) =>
        {
            kv
        }
        _ => {
            let mut loan = tx.loan(layout)?;
            ctx.write_into(loan.writer())?;
            loan.finish()?.send()?;
            return Ok(());
        }
    };
    // Held until the loan is finished: a GPU model's sections stay valid and
    // unwritten that long.
    let sections = kv.sections()?;
    let mut loan = tx.loan_device(layout)?;
    for (i, section) in sections.iter().enumerate() {
        let expected = layout.section(i).len;
        if section.len() as u64 != expected {
            bail!(
                "KV section {i} is {} bytes, the message lays out {expected}",
                section.len()
            );
        }
        match (section.host(), section.device()) {
            (Some(bytes), _) => loan.write_from_host(i, bytes)?,
            // SAFETY: `section` is device memory of the section's length
            // (checked above) on the model's GPU, which is the transport's
            // device (`same_gpu` above); its writes have finished
            // (`KvCache::sections`), and `sections` keeps it alive and
            // unwritten until after `finish`.
            (None, Some((addr, _))) => unsafe { loan.write_from_device(i, addr)? },
            (None, None) => unreachable!("a section is in host or device memory"),
        }
    }
    loan.finish()?.send()?;
    drop(sections);
    Ok(())
}

/// The context `guard` holds for `model`, when it is a device message
/// (`guard.on_device()`): its KV cache goes straight into the model's tensors
/// when they are on the session's GPU, through host buffers otherwise.
pub fn receive_device(guard: &RecvGuard, model: &Model) -> anyhow::Result<Context> {
    let header = guard.header();
    let to = match same_gpu(Some(model.device()), guard.device()) {
        true => FillTo::Model,
        false => FillTo::Host,
    };
    Context::from_sections(header, model, to, |i, target| {
        let expected = header.section(i)?.len;
        match target {
            KvTarget::Host(buf) => guard.copy_section_to_host(i, buf)?,
            KvTarget::Device { addr, len } => {
                if len as u64 != expected {
                    return Err(format!(
                        "section {i} is {expected} bytes, the model's tensor {len}"
                    )
                    .into());
                }
                // SAFETY: `addr` is `len` bytes of the model's fresh tensor on
                // the session's GPU (`FillTo::Model` only then), used by no
                // one else until this returns (`KvTarget::Device`), and `len`
                // is the section's length, checked above.
                unsafe { guard.copy_section_to_device(i, addr)? }
            }
        }
        Ok(())
    })
    .context("reading the researcher's context from device memory")
}
