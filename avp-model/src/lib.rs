//! avp-model: the burn-backed decoder that produces and consumes the state avp moves (not built yet).
