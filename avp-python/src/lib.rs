//! `avp_rs`: avp for Python. Listen, accept and receive KV caches as
//! zero-copy NumPy/DLPack views of the transport's memory; connect and send
//! Hugging Face style caches. See `python/avp_rs/__init__.pyi` for the API.

mod dlpack;
mod endpoint;
mod errors;
mod loan;
mod message;
mod model;
mod wire;

use pyo3::prelude::*;

#[pymodule]
fn _avp_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(endpoint::listen, m)?)?;
    m.add_function(wrap_pyfunction!(endpoint::connect, m)?)?;
    m.add_function(wrap_pyfunction!(wire::decode, m)?)?;
    m.add_function(wrap_pyfunction!(wire::encode_kv, m)?)?;
    m.add_function(wrap_pyfunction!(wire::inspect, m)?)?;
    m.add_function(wrap_pyfunction!(model::generate, m)?)?;
    m.add_class::<model::Model>()?;
    m.add_class::<model::Context>()?;
    m.add_class::<endpoint::Listener>()?;
    m.add_class::<endpoint::Receiver>()?;
    m.add_class::<endpoint::Sender>()?;
    m.add_class::<message::Message>()?;
    m.add_class::<message::KvView>()?;
    m.add_class::<message::Section>()?;
    m.add_class::<loan::Loan>()?;
    m.add_class::<loan::LoanSection>()?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
