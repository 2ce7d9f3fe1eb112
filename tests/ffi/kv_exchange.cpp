// The C++ RAII layer (avp.hpp) moving a multi-layer KV cache between two processes.
//
//   kv_exchange_cpp recv ADDR [tcp|cuda]   /   kv_exchange_cpp send ADDR [tcp|cuda]
//
// With "cuda" the sections live in device memory (the emulated device: device
// addresses are host addresses, so this program plays the kernels).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include "avp.hpp"

namespace {

constexpr uint32_t kLayers = 4, kHeads = 3, kHeadDim = 32, kSeq = 50, kCount = 4;
constexpr std::chrono::seconds kTimeout{30};

uint8_t pattern(uint32_t n, uint32_t layer, uint32_t part, size_t j) {
  return static_cast<uint8_t>(n * 57u + layer * 29u + part * 3u + j * 11u);
}

avp_payload kv() {
  avp_payload p{};
  p.kind = AVP_KIND_KV_CACHE;
  p.kv.num_layers = kLayers;
  p.kv.num_kv_heads = kHeads;
  p.kv.head_dim = kHeadDim;
  p.kv.seq_len = kSeq;
  p.kv.dtype = AVP_DTYPE_BF16;
  p.kv.layout = AVP_LAYOUT_NHD;
  return p;
}

avp::Options device_options() {
  avp::Options o;
  o.raw.device = AVP_DEVICE_EMULATED;
  o.raw.device_slot_size = 64 * 1024;
  return o;
}

int recv_device(const std::string& addr) {
  avp::Options o = device_options();
  auto listener = avp::Listener::bind(addr, nullptr, &o);
  std::cout << "ADDR " << listener.address() << std::endl;
  avp::Receiver rx = listener.accept(kTimeout);
  if (rx.session().transport != AVP_TRANSPORT_CUDA) throw std::runtime_error("not a cuda session");
  for (uint32_t n = 0; n < kCount; n++) {
    avp::Message m = rx.recv(kTimeout);
    if (!m.on_device()) throw std::runtime_error("not on the device");
    for (size_t s = 0; s < 2 * kLayers; s++) {
      avp::DeviceSpan d = m.device_section(s);
      std::string host(d.size, '\0');
      m.copy_section_to_host(s, host.data(), host.size());
      const uint8_t* kernel_view = reinterpret_cast<const uint8_t*>(d.addr);
      for (size_t j = 0; j < d.size; j++) {
        uint8_t want = pattern(n, static_cast<uint32_t>(s / 2), static_cast<uint32_t>(s % 2), j);
        if (kernel_view[j] != want || static_cast<uint8_t>(host[j]) != want)
          throw std::runtime_error("device byte differs");
      }
    }
    try {
      m.section(0);
      throw std::runtime_error("device sections read as host bytes");
    } catch (const avp::Error& e) {
      if (e.status() != AVP_ERR_PLACEMENT) throw;
    }
  }
  std::cout << "OK" << std::endl;
  return 0;
}

int send_device(const std::string& addr) {
  avp::Options o = device_options();
  avp::Sender tx = avp::Sender::connect(addr, nullptr, &o);
  for (uint32_t n = 0; n < kCount; n++) {
    avp::DeviceLoan loan = tx.loan_device(kv());
    if (!loan.on_device()) throw std::runtime_error("loan not on the device");
    for (size_t s = 0; s < 2 * kLayers; s++) {
      auto layer = static_cast<uint32_t>(s / 2), part = static_cast<uint32_t>(s % 2);
      avp::DeviceSpan d = loan.section(s);  // "kernel" writes in place
      auto* out = reinterpret_cast<uint8_t*>(d.addr);
      for (size_t j = 0; j < d.size; j++) out[j] = pattern(n, layer, part, j);
    }
    loan.send();
  }
  {
    avp::DeviceLoan unused = tx.loan_device(kv());  // dropped: discarded
  }
  std::cout << "SENT" << std::endl;
  return 0;
}

int recv(const std::string& addr, bool tcp) {
  avp::Options o;
  o.raw.allow_shm_upgrade = tcp ? 0 : 1;
  auto listener = avp::Listener::bind(addr, nullptr, &o);
  std::cout << "ADDR " << listener.address() << std::endl;
  avp::Receiver rx = listener.accept(kTimeout);
  avp_session_info s = rx.session();
  if ((s.transport == AVP_TRANSPORT_TCP) != tcp) throw std::runtime_error("unexpected transport");
  avp::Bytes pool{};
  if (!tcp) pool = rx.pool_range();
  for (uint32_t n = 0; n < kCount; n++) {
    avp::Message m = rx.recv(kTimeout);
    avp_message_info info = m.info();
    if (info.kv.num_layers != kLayers || info.kv.layout != AVP_LAYOUT_NHD) throw std::runtime_error("shape");
    for (uint32_t layer = 0; layer < kLayers; layer++) {
      for (uint32_t part = 0; part < 2; part++) {
        avp::Bytes b = m.kv_section(layer, static_cast<avp_kv_part>(part));
        if (!tcp && (b.data < pool.data || b.data + b.size > pool.data + pool.size))
          throw std::runtime_error("section outside the shared pool");
        for (size_t j = 0; j < b.size; j++)
          if (b.data[j] != pattern(n, layer, part, j)) throw std::runtime_error("byte differs");
      }
    }
    m.verify();
    if (m.envelope(AVP_FIELD_SOURCE_AGENT_ID) != "cpp-engine") throw std::runtime_error("envelope");
  }
  try {
    rx.recv(std::chrono::seconds(10));
    throw std::runtime_error("expected the sender to leave");
  } catch (const avp::Error& e) {
    if (e.status() != AVP_ERR_PEER_GONE) throw;
  }
  std::cout << "OK" << std::endl;
  return 0;
}

int send(const std::string& addr, bool tcp) {
  avp::Options o;
  o.raw.allow_shm_upgrade = tcp ? 0 : 1;
  avp::Sender tx = avp::Sender::connect(addr, nullptr, &o);
  avp_envelope env{};
  env.source_agent_id = "cpp-engine";
  for (uint32_t n = 0; n < kCount; n++) {
    avp::Loan loan = tx.loan(kv(), &env);
    for (uint32_t layer = 0; layer < kLayers; layer++) {
      for (uint32_t part = 0; part < 2; part++) {
        avp::MutBytes b = loan.kv_section(layer, static_cast<avp_kv_part>(part));
        for (size_t j = 0; j < b.size; j++) b.data[j] = pattern(n, layer, part, j);
      }
    }
    loan.send();
  }
  {
    avp::Loan unused = tx.loan(kv(), &env);  // dropped: discarded, slot returned
  }
  std::cout << "SENT" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return 64;
  bool tcp = argc >= 4 && std::strcmp(argv[3], "tcp") == 0;
  bool cuda = argc >= 4 && std::strcmp(argv[3], "cuda") == 0;
  try {
    if (cuda) return std::strcmp(argv[1], "recv") == 0 ? recv_device(argv[2]) : send_device(argv[2]);
    return std::strcmp(argv[1], "recv") == 0 ? recv(argv[2], tcp) : send(argv[2], tcp);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
