//! avp-transport: moves avp messages between agents over shared memory, TCP, CUDA IPC and RDMA (not built yet).
