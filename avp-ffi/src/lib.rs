//! avp-ffi: the C ABI through which C and C++ engines send and receive KV-caches (not built yet).
